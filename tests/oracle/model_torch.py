"""Independent PyTorch implementation of the mta model (a Llama-style decoder), for the oracle test
(check_model.py) and the CPU training benchmark (bench/train_cpu.py).

Functional code on a dict of parameter tensors named as in the C++ model (src/model/model.cpp):

    tok_embeddings.weight [V, C]                    (tied with the output layer)
    layers.{l}.attention_norm.weight [C]
    layers.{l}.attention.w{q,k,v,o}.weight [C, C]   ([out, in], no bias)
    layers.{l}.attention.{kq_pre,head_pre,kq_post,head_post,norm,gate_w,gate_b}   (MTA, when enabled)
    layers.{l}.attention.lambda_{q1,k1,q2,k2} [d], layers.{l}.attention.subln.weight [2d]   (DIFF)
    layers.{l}.ffn_norm.weight [C]
    layers.{l}.feed_forward.w1.weight [F, C], w3 [F, C], w2 [C, F]
    norm.weight [C]

The config is the JSON dict of a config's "model" section. Layer l:
    x = x + drop(wo(concat_heads(attn(rope(q), rope(k), v))))    q, k, v = w{q,k,v}(rmsnorm(x))
    x = x + drop(w2(silu(w1 h) * w3 h))                          h = rmsnorm(x)
then logits = rmsnorm(x) @ E^T, loss = sum(w * CE) / sum(w).
Attention: standard causal softmax (scale 1/sqrt(d)); MTA via mta_torch.mta_attention with the layer's
spec; DIFF (Ye et al., "Differential Transformer"): H sub-heads of dim d = C/H in pairs (2h, 2h+1)
sharing value head h of dim 2d, out_h = (A_2h - lambda A_2h+1) V_h, lambda = exp(lq1.lk1) -
exp(lq2.lk2) + lambda_init, lambda_init = 0.8 - 0.6 exp(-0.3 l), then RMSNorm(2d, eps 1e-5) *
subln.weight * (1 - lambda_init). Attention dropout (training only) acts on the final attention
weights (MTA: A3; DIFF: each sub-head's softmax).

Run with Debian's /usr/bin/python3 (the one with torch).
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mta_torch as mt  # noqa: E402

SUBLN_EPS = 1e-5
USE_SDPA = False  # bench/train_gpu.py sets it: standard attention through F.scaled_dot_product_attention
MTA_KEYS = ("kq_pre", "head_pre", "kq_post", "head_post", "norm", "gate")


# --------------------------------------------------------------------------------------- config --
def ffn_hidden(cfg):
    if cfg.get("ffn_hidden"):
        return int(cfg["ffn_hidden"])
    m = int(cfg.get("ffn_multiple_of", 256))
    hidden = 2 * (4 * cfg["dim"]) // 3
    return m * ((hidden + m - 1) // m)


def attn_type(cfg):
    return cfg.get("attention", {}).get("type", "standard")


def head_dim(cfg):
    return cfg["dim"] // cfg["n_heads"]


def kq_layers(cfg):
    a = cfg.get("attention", {})
    kl = a.get("kq_layers", "all")
    return list(range(cfg["n_layers"])) if kl == "all" or kl is None else list(kl)


def layer_spec(cfg, l):
    """mta_torch spec of layer l (MTA only): kq_pre / kq_post only on kq_layers, the rest everywhere."""
    a = cfg["attention"]
    spec = {"heads": cfg["n_heads"], "head_dim": head_dim(cfg)}
    for key in MTA_KEYS:
        if a.get(key) is not None and a.get(key) is not False:
            spec[key] = a[key]
    if l not in kq_layers(cfg):
        spec.pop("kq_pre", None)
        spec.pop("kq_post", None)
    if a.get("depth_scale"):
        spec["depth_scale_layer"] = l
    return spec


def diff_lambda_init(l):
    return 0.8 - 0.6 * math.exp(-0.3 * l)


def param_shapes(cfg):
    """{name: (shape, decay)} in the C++ layout order; decay marks the matrices (AdamW weight decay)."""
    C, V, F_, d = cfg["dim"], cfg["vocab_size"], ffn_hidden(cfg), head_dim(cfg)
    kind = attn_type(cfg)
    out = {"tok_embeddings.weight": ((V, C), True)}
    for l in range(cfg["n_layers"]):
        p = f"layers.{l}."
        out[p + "attention_norm.weight"] = ((C,), False)
        for w in ("wq", "wk", "wv", "wo"):
            out[p + f"attention.{w}.weight"] = ((C, C), True)
        if kind == "mta":
            for n, s in mt.param_shapes(layer_spec(cfg, l)).items():
                out[p + "attention." + n] = (tuple(s), False)
        elif kind == "diff":
            for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                out[p + "attention." + n] = ((d,), False)
            out[p + "attention.subln.weight"] = ((2 * d,), False)
        out[p + "ffn_norm.weight"] = ((C,), False)
        out[p + "feed_forward.w1.weight"] = ((F_, C), True)
        out[p + "feed_forward.w3.weight"] = ((F_, C), True)
        out[p + "feed_forward.w2.weight"] = ((C, F_), True)
    out["norm.weight"] = ((C,), False)
    return out


def init_params(cfg, gen=None, dtype=torch.float32):
    """The C++ model's initialisation rule (not its random numbers): matrices N(0, init_std), RMSNorm
    weights 1, MTA kernels identity, DIFF lambdas N(0, 0.1)."""
    std = float(cfg.get("init_std", 0.02))
    params = {}
    ident = {}
    if attn_type(cfg) == "mta":
        for l in range(cfg["n_layers"]):
            for n, w in mt.identity_params(layer_spec(cfg, l), dtype).items():
                ident[f"layers.{l}.attention.{n}"] = w
    for name, (shape, decay) in param_shapes(cfg).items():
        if decay:
            w = std * torch.randn(shape, generator=gen, dtype=dtype)
        elif name.endswith("norm.weight") or name.endswith("subln.weight"):
            w = torch.ones(shape, dtype=dtype)
        elif ".lambda_" in name:
            w = 0.1 * torch.randn(shape, generator=gen, dtype=dtype)
        else:
            w = ident[name].clone()
        params[name] = w
    return params


# --------------------------------------------------------------------------------------- layers --
def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w


def rope(x, theta):
    """x [B, H, T, d]: rotate the interleaved pairs (2i, 2i+1) by angle t * theta^(-2i/d)."""
    B, H, T, d = x.shape
    i = torch.arange(d // 2, dtype=torch.float64, device=x.device)
    t = torch.arange(T, dtype=torch.float64, device=x.device)
    ang = t[:, None] * torch.pow(torch.tensor(float(theta), dtype=torch.float64, device=x.device), -2.0 * i / d)[None, :]
    c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)  # [T, d/2]
    xp = x.reshape(B, H, T, d // 2, 2)
    a, b = xp[..., 0], xp[..., 1]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).reshape(B, H, T, d)


def split_heads(x, H):
    B, T, C = x.shape
    return x.reshape(B, T, H, C // H).transpose(1, 2)  # [B, H, T, C/H]


def merge_heads(x):
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


def causal_softmax(q, k):
    T, d = q.shape[-2], q.shape[-1]
    S = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    return torch.softmax(S.masked_fill(mt.future_mask(T, q.device), float("-inf")), dim=-1)


def mta_attention_dropout(spec, q, k, v, params, p):
    """mta_torch.mta_attention with dropout on A3 (training); built from mta_torch's pieces."""
    A, _ = mt.weights_before_head_post(spec, q, k, params)
    if mt._on(spec, "head_post"):
        A = mt.head_mix(A, params["head_post"])
    O = torch.matmul(F.dropout(A, p, True), v)
    if mt._on(spec, "norm"):
        O = O * torch.rsqrt(O.pow(2).mean(dim=-1, keepdim=True) + mt.NORM_EPS) * params["norm"]
    if spec.get("depth_scale_layer") is not None:
        O = O * mt.depth_scale(spec["depth_scale_layer"])
    if mt._on(spec, "gate"):
        O = O * torch.sigmoid(O @ params["gate_w"] + params["gate_b"]).unsqueeze(-1)
    return O


def attention(cfg, params, l, x, p_drop, training):
    """x [B, T, C] (normalised) -> [B, T, C] before wo."""
    H, theta = cfg["n_heads"], float(cfg.get("rope_theta", 1e5))
    pre = f"layers.{l}.attention."
    q = rope(split_heads(x @ params[pre + "wq.weight"].T, H), theta)
    k = rope(split_heads(x @ params[pre + "wk.weight"].T, H), theta)
    v_flat = x @ params[pre + "wv.weight"].T
    drop = p_drop if training else 0.0
    kind = attn_type(cfg)
    if kind == "standard":
        if USE_SDPA and drop == 0:  # the benchmark's fast baseline (PyTorch >= 2.0): same function
            return merge_heads(F.scaled_dot_product_attention(q, k, split_heads(v_flat, H), is_causal=True))
        A = causal_softmax(q, k)
        return merge_heads(torch.matmul(F.dropout(A, drop, training), split_heads(v_flat, H)))
    if kind == "mta":
        spec = layer_spec(cfg, l)
        names = mt.param_shapes(spec)
        ap = {n: params[pre + n] for n in names}
        v = split_heads(v_flat, H)
        if drop > 0:
            return merge_heads(mta_attention_dropout(spec, q, k, v, ap, drop))
        return merge_heads(mt.mta_attention(spec, q, k, v, ap))
    if kind == "diff":
        B, T, _ = x.shape
        Hd = H // 2
        v = split_heads(v_flat, Hd)                                    # [B, H/2, T, 2d]
        A = F.dropout(causal_softmax(q, k), drop, training)            # [B, H, T, T]
        A = A.reshape(B, Hd, 2, T, T)
        lam = (torch.exp(torch.dot(params[pre + "lambda_q1"], params[pre + "lambda_k1"]))
               - torch.exp(torch.dot(params[pre + "lambda_q2"], params[pre + "lambda_k2"]))
               + diff_lambda_init(l))
        o = torch.matmul(A[:, :, 0], v) - lam * torch.matmul(A[:, :, 1], v)  # [B, H/2, T, 2d]
        o = rms_norm(o, params[pre + "subln.weight"], SUBLN_EPS) * (1.0 - diff_lambda_init(l))
        return merge_heads(o)
    raise ValueError(f"unknown attention type {kind!r}")


def forward(cfg, params, inputs, training=False):
    """inputs [B, T] (int64) -> logits [B, T, V]. Dropout (config's model.dropout) only when training."""
    eps = float(cfg.get("norm_eps", 1e-5))
    p = float(cfg.get("dropout", 0.0)) if training else 0.0
    E = params["tok_embeddings.weight"]
    x = E[inputs]
    for l in range(cfg["n_layers"]):
        pre = f"layers.{l}."
        h = rms_norm(x, params[pre + "attention_norm.weight"], eps)
        a = attention(cfg, params, l, h, p, training) @ params[pre + "attention.wo.weight"].T
        x = x + F.dropout(a, p, training)
        h = rms_norm(x, params[pre + "ffn_norm.weight"], eps)
        f = (F.silu(h @ params[pre + "feed_forward.w1.weight"].T) * (h @ params[pre + "feed_forward.w3.weight"].T)) \
            @ params[pre + "feed_forward.w2.weight"].T
        x = x + F.dropout(f, p, training)
    x = rms_norm(x, params["norm.weight"], eps)
    return x @ E.T


def loss_fn(cfg, params, inputs, targets, weights, training=False):
    """sum(weights * cross-entropy) / sum(weights); targets at zero-weight positions are ignored."""
    logits = forward(cfg, params, inputs, training)
    V = logits.shape[-1]
    w = weights.to(logits.dtype)
    tg = torch.where(weights != 0, targets, torch.zeros_like(targets))
    ce = F.cross_entropy(logits.reshape(-1, V), tg.reshape(-1), reduction="none").reshape(w.shape)
    return (w * ce).sum() / w.sum()


def loss_and_grads(cfg, params, inputs, targets, weights):
    """Mean loss and {name: gradient} (autograd, no dropout), in the params' dtype."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    loss = loss_fn(cfg, leaves, inputs, targets, weights, training=False)
    names = list(leaves)
    gs = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    grads = {n: (torch.zeros_like(leaves[n]) if g is None else g.detach()) for n, g in zip(names, gs)}
    return loss.detach(), grads
