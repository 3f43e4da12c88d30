"""Independent PyTorch oracle of Multi-Token Attention (shared/design/mta-semantics.md).

Written with high-level torch ops (pad + grouped conv2d, einsum, masked_fill, softmax) so that it
reads like the page and shares nothing with the loop-based C++ code. Works in float32 and float64.

    mta_attention(spec, q, k, v, params) -> out            q, k, v: [B, H, T, D]
    forward_backward(spec, tensors) -> (out, grads)         grads named grad_q, grad_k, grad_v, grad_<param>
    identity_params(spec, dtype) -> params                  the paper's identity initialisation
    random_params(spec, gen, dtype) -> params               random non-identity weights
    param_shapes(spec) -> {name: shape}                     enabled parameters, in the page's order

`spec` is the JSON dict of the `mta attn` command: absent or None members are disabled.
Run with Debian's /usr/bin/python3 (the one with torch).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

NORM_EPS = 1e-5
PARAM_ORDER = ("kq_pre", "head_pre", "kq_post", "head_post", "norm", "gate_w", "gate_b")


# ----------------------------------------------------------------------------------------- spec --
def _on(spec, key):
    v = spec.get(key)
    return v is not None and v is not False


def key_offset(conv):
    ck = conv["k"]
    pad = conv.get("pad_key", "both")
    if pad == "both":
        assert ck % 2 == 1, "pad_key 'both' needs an odd k"
        return (ck - 1) // 2
    if pad == "left":
        return ck - 1
    if pad == "right":
        return 0
    raise ValueError(f"unknown pad_key {pad!r}")


def param_shapes(spec):
    H, D = spec["heads"], spec["head_dim"]
    shapes = {}
    for name in ("kq_pre", "kq_post"):
        if _on(spec, name):
            shapes[name] = (H, spec[name]["q"], spec[name]["k"])
    for name in ("head_pre", "head_post"):
        if _on(spec, name):
            g = spec[name]["group"]
            assert H % g == 0
            shapes[name] = (H // g, g, g)
    if _on(spec, "norm"):
        shapes["norm"] = (D,)
    if _on(spec, "gate"):
        shapes["gate_w"] = (D,)
        shapes["gate_b"] = (1,)
    return {n: shapes[n] for n in PARAM_ORDER if n in shapes}


def depth_scale(layer):
    lam = 0.8 - 0.6 * math.exp(-0.3 * layer)
    return 1.0 - lam


# ------------------------------------------------------------------------------------ the pieces --
def future_mask(T, device=None):
    """[T, T] bool, True where key j > query i."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)


def kq_conv(x, w, conv):
    """Key-query convolution of x [B, H, T, T] with one kernel per head w [H, cq, ck].

    out[b,h,i,j] = sum_{a,c} w[h,a,c] * x[b,h, i-(cq-1)+a, j-o+c], zero outside. conv2d is a
    cross-correlation: out[i,j] = sum w[a,c] * xpad[i+a, j+c], so pad cq-1 rows on top and o columns
    on the left (ck-1-o on the right)."""
    H, cq, ck = w.shape
    o = key_offset(conv)
    xp = F.pad(x, (o, ck - 1 - o, cq - 1, 0))  # (left, right, top, bottom)
    return F.conv2d(xp, w.unsqueeze(1), groups=H)


def head_mix(x, m):
    """C'[b, G*g+x, i, j] = sum_y M[G, x, y] C[b, G*g+y, i, j]."""
    B, H, T, T2 = x.shape
    ng, g, _ = m.shape
    xg = x.reshape(B, ng, g, T, T2)
    return torch.einsum("Gxy,bGyij->bGxij", m, xg).reshape(B, H, T, T2)


def weights_before_head_post(spec, q, k, params):
    """Steps 1-5: the attention weights after the softmax and kq_post (head_post's input), and the
    future mask. Shared with model_torch's dropout variant and replay_bf16_sums.py."""
    T, D = q.shape[-2], q.shape[-1]
    fut = future_mask(T, q.device)
    S = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)                  # 1. logits
    C = S
    if _on(spec, "kq_pre"):                                                    # 2.
        C = kq_conv(S.masked_fill(fut, 0.0), params["kq_pre"], spec["kq_pre"])
    if _on(spec, "head_pre"):                                                  # 3.
        C = head_mix(C, params["head_pre"])
    A = torch.softmax(C.masked_fill(fut, float("-inf")), dim=-1)               # 4.
    if _on(spec, "kq_post"):                                                   # 5.
        A = kq_conv(A, params["kq_post"], spec["kq_post"]).masked_fill(fut, 0.0)
    return A, fut


def mta_attention(spec, q, k, v, params, core_round=None):
    """core_round: optional function applied to the output of step 7 (the core) before the epilogue,
    e.g. a rounding to bf16 as fused kernels with bf16 outputs do (check_attn.py's bf16 tolerances)."""
    B, H, T, D = q.shape
    assert H == spec["heads"] and D == spec["head_dim"], "q shape does not match the spec"
    assert k.shape == q.shape and v.shape == q.shape
    A, _ = weights_before_head_post(spec, q, k, params)                       # 1-5.
    if _on(spec, "head_post"):                                                 # 6.
        A = head_mix(A, params["head_post"])
    O = torch.matmul(A, v)                                                     # 7.
    if core_round is not None:
        O = core_round(O)
    if _on(spec, "norm"):                                                      # 8.
        O = O * torch.rsqrt(O.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS) * params["norm"]
    if spec.get("depth_scale_layer") is not None:                              # 9.
        O = O * depth_scale(spec["depth_scale_layer"])
    if _on(spec, "gate"):                                                      # 10.
        O = O * torch.sigmoid(O @ params["gate_w"] + params["gate_b"]).unsqueeze(-1)
    return O


# -------------------------------------------------------------------------------------- helpers --
def _as_tensor(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype).clone()
    return torch.from_numpy(np.asarray(x)).to(dtype).clone()


def forward_backward(spec, tensors, dtype=None, core_round=None):
    """tensors: q, k, v, every enabled parameter and optionally dout (numpy arrays or torch tensors).
    Returns (out, grads) as detached torch tensors; grads is {} when dout is absent, else
    {grad_q, grad_k, grad_v, grad_<param> for every enabled param}. dtype defaults to q's dtype."""
    if dtype is None:
        q0 = tensors["q"]
        dtype = q0.dtype if isinstance(q0, torch.Tensor) else torch.from_numpy(np.asarray(q0)).dtype
    names = ["q", "k", "v"] + list(param_shapes(spec))
    leaves = {n: _as_tensor(tensors[n], dtype).requires_grad_(True) for n in names}
    params = {n: leaves[n] for n in names[3:]}
    out = mta_attention(spec, leaves["q"], leaves["k"], leaves["v"], params, core_round=core_round)
    grads = {}
    if tensors.get("dout") is not None:
        dout = _as_tensor(tensors["dout"], dtype)
        gs = torch.autograd.grad(out, [leaves[n] for n in names], grad_outputs=dout, allow_unused=True)
        for n, g in zip(names, gs):
            grads["grad_" + n] = torch.zeros_like(leaves[n]) if g is None else g.detach()
    return out.detach(), grads


def identity_params(spec, dtype=torch.float64):
    p = {}
    for name, shape in param_shapes(spec).items():
        if name in ("kq_pre", "kq_post"):
            w = torch.zeros(shape, dtype=dtype)
            w[:, shape[1] - 1, key_offset(spec[name])] = 1.0
        elif name in ("head_pre", "head_post"):
            w = torch.eye(shape[1], dtype=dtype).expand(shape).clone()
        elif name == "norm":
            w = torch.ones(shape, dtype=dtype)
        else:  # gate_w, gate_b: sigmoid(0) = 1/2
            w = torch.zeros(shape, dtype=dtype)
        p[name] = w
    return p


def random_params(spec, gen=None, dtype=torch.float64, kernel_std=0.5):
    """Random non-identity weights: conv/mix kernels N(0, kernel_std), norm 1 + 0.3 N, gate N(0, 0.5)."""
    p = {}
    for name, shape in param_shapes(spec).items():
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name in ("kq_pre", "kq_post", "head_pre", "head_post"):
            w = kernel_std * r
        elif name == "norm":
            w = 1.0 + 0.3 * r
        else:
            w = 0.5 * r
        p[name] = w.to(dtype)
    return p


def random_spec(rng, heads=None, head_dim=None, p_on=0.5):
    """A random valid spec (rng: numpy Generator). Every option is independently on with p_on."""
    H = heads if heads is not None else int(rng.choice([1, 2, 3, 4, 6, 8]))
    D = head_dim if head_dim is not None else int(rng.integers(1, 33))
    spec = {"heads": H, "head_dim": D}

    def conv():
        pad = str(rng.choice(["both", "left", "right"]))
        ck = int(rng.integers(1, 12))
        if pad == "both" and ck % 2 == 0:
            ck = ck + 1 if ck < 11 else ck - 1
        return {"q": int(rng.integers(1, 7)), "k": ck, "pad_key": pad}

    def mix():
        return {"group": int(rng.choice([g for g in range(1, H + 1) if H % g == 0]))}

    for name, make in (("kq_pre", conv), ("head_pre", mix), ("kq_post", conv), ("head_post", mix)):
        if rng.random() < p_on:
            spec[name] = make()
    if rng.random() < p_on:
        spec["norm"] = True
    if rng.random() < p_on:
        spec["depth_scale_layer"] = int(rng.integers(0, 24))
    if rng.random() < p_on:
        spec["gate"] = True
    return spec


def spec_summary(spec):
    parts = [f"H={spec['heads']} D={spec['head_dim']}"]
    for name in ("kq_pre", "kq_post"):
        if _on(spec, name):
            c = spec[name]
            parts.append(f"{name}={c['q']}x{c['k']}{c.get('pad_key', 'both')[0].upper()}")
    for name in ("head_pre", "head_post"):
        if _on(spec, name):
            parts.append(f"{name}=g{spec[name]['group']}")
    if _on(spec, "norm"):
        parts.append("norm")
    if spec.get("depth_scale_layer") is not None:
        parts.append(f"depth={spec['depth_scale_layer']}")
    if _on(spec, "gate"):
        parts.append("gate")
    return " ".join(parts)
