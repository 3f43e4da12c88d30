#!/usr/bin/python3
"""Self-checks of the torch oracle (mta_torch.py) and of st.py, runnable standalone:

    /usr/bin/python3 tests/oracle/selftest_mta_torch.py

1. identity-initialised MTA == plain causal softmax attention (then norm / depth scale / gate);
2. mta_attention == an explicit-loop float64 transcription of the page, random non-identity weights,
   every option and pad mode, including T smaller than the kernels;
3. the head-mixing convention (C'[G*g+x] = sum_y M[G,x,y] C[G*g+y]) and the released code's
   head_kernel convention for head_post (M = K with the last two axes swapped);
4. autograd gradients vs central finite differences (torch.autograd.gradcheck, float64);
5. forward_backward: names and shapes of the gradients, float32 close to float64;
6. st.py round trips (F32, F64, F16, BF16, metadata) and the byte layout.
Prints one line per check and `N passed, M failed`; exits 1 on failure.
"""
import itertools
import json
import math
import os
import struct
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mta_torch as mt  # noqa: E402
import st  # noqa: E402

RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}")


def rel(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


# ------------------------------------------------------------------------------ loop reference --
def loop_mta(spec, q, k, v, params):
    """Explicit loops over every index, straight from the page (numpy float64)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    P = {n: np.asarray(x, dtype=np.float64) for n, x in params.items()}
    B, H, T, D = q.shape
    s = 1.0 / math.sqrt(D)
    S = np.zeros((B, H, T, T))
    for b, h, i, j in itertools.product(range(B), range(H), range(T), range(T)):
        S[b, h, i, j] = s * sum(q[b, h, i, d] * k[b, h, j, d] for d in range(D))

    def conv(X, W, c):
        cq, ck = c["q"], c["k"]
        o = {"both": (ck - 1) // 2, "left": ck - 1, "right": 0}[c["pad_key"]]
        Y = np.zeros_like(X)
        for b, h, i, j in itertools.product(range(B), range(H), range(T), range(T)):
            acc = 0.0
            for a in range(cq):
                for cc in range(ck):
                    ii, jj = i - (cq - 1) + a, j - o + cc
                    if 0 <= ii < T and 0 <= jj < T:
                        acc += W[h, a, cc] * X[b, h, ii, jj]
            Y[b, h, i, j] = acc
        return Y

    def mix(X, M):
        g = M.shape[1]
        Y = np.zeros_like(X)
        for b, hh, i, j in itertools.product(range(B), range(H), range(T), range(T)):
            G, x = divmod(hh, g)
            Y[b, hh, i, j] = sum(M[G, x, y] * X[b, G * g + y, i, j] for y in range(g))
        return Y

    C = S.copy()
    if spec.get("kq_pre"):
        S0 = S.copy()
        for i, j in itertools.product(range(T), range(T)):
            if j > i:
                S0[:, :, i, j] = 0.0
        C = conv(S0, P["kq_pre"], spec["kq_pre"])
    if spec.get("head_pre"):
        C = mix(C, P["head_pre"])
    A = np.zeros_like(C)
    for b, h, i in itertools.product(range(B), range(H), range(T)):
        m = max(C[b, h, i, j] for j in range(i + 1))
        e = [math.exp(C[b, h, i, j] - m) for j in range(i + 1)]
        z = sum(e)
        for j in range(i + 1):
            A[b, h, i, j] = e[j] / z
    if spec.get("kq_post"):
        A = conv(A, P["kq_post"], spec["kq_post"])
        for i, j in itertools.product(range(T), range(T)):
            if j > i:
                A[:, :, i, j] = 0.0
    if spec.get("head_post"):
        A = mix(A, P["head_post"])
    O = np.zeros((B, H, T, D))
    for b, h, i, d in itertools.product(range(B), range(H), range(T), range(D)):
        O[b, h, i, d] = sum(A[b, h, i, j] * v[b, h, j, d] for j in range(T))
    for b, h, i in itertools.product(range(B), range(H), range(T)):
        row = O[b, h, i].copy()
        if spec.get("norm"):
            r = math.sqrt(sum(x * x for x in row) / D + 1e-5)
            row = np.array([row[d] / r * P["norm"][d] for d in range(D)])
        if spec.get("depth_scale_layer") is not None:
            lam = 0.8 - 0.6 * math.exp(-0.3 * spec["depth_scale_layer"])
            row = row * (1 - lam)
        if spec.get("gate"):
            z = sum(row[d] * P["gate_w"][d] for d in range(D)) + P["gate_b"][0]
            row = row * (1.0 / (1.0 + math.exp(-z)))
        O[b, h, i] = row
    return O


def plain_causal_attention(q, k, v):
    """Standard causal attention, one query row at a time (no mask tensor)."""
    B, H, T, D = q.shape
    out = torch.zeros_like(q)
    for i in range(T):
        logits = torch.einsum("bhd,bhjd->bhj", q[:, :, i], k[:, :, : i + 1]) / math.sqrt(D)
        w = torch.softmax(logits, dim=-1)
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", w, v[:, :, : i + 1])
    return out


def main():
    rng = np.random.default_rng(1234)
    gen = torch.Generator().manual_seed(1234)
    dt = torch.float64

    # 1. identity initialisation == plain causal attention ------------------------------------
    for pad, (cq, ck), H, g, T in [("both", (6, 11), 4, 2, 9), ("left", (3, 4), 6, 3, 5),
                                   ("right", (2, 5), 8, 8, 13), ("both", (1, 1), 1, 1, 1),
                                   ("left", (6, 11), 3, 1, 3), ("right", (4, 2), 2, 2, 2)]:
        D, B = 5, 2
        spec = {"heads": H, "head_dim": D, "kq_pre": {"q": cq, "k": ck, "pad_key": pad},
                "head_pre": {"group": g}, "kq_post": {"q": cq, "k": ck, "pad_key": pad},
                "head_post": {"group": g}}
        q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=dt) for _ in range(3))
        ref = plain_causal_attention(q, k, v)
        got = mt.mta_attention(spec, q, k, v, mt.identity_params(spec, dt))
        e = rel(got, ref)
        check(f"identity MTA == causal attention [{mt.spec_summary(spec)} T={T}]", e < 1e-13, f"rel {e:.2e}")
        # with norm, depth scaling and gate (identity gate weights: sigmoid(0) = 1/2)
        spec2 = dict(spec, norm=True, depth_scale_layer=3, gate=True)
        got2 = mt.mta_attention(spec2, q, k, v, mt.identity_params(spec2, dt))
        r = ref / torch.sqrt(ref.pow(2).mean(-1, keepdim=True) + 1e-5)
        r = r * (1 - (0.8 - 0.6 * math.exp(-0.9))) * 0.5
        e = rel(got2, r)
        check(f"identity MTA + norm/scale/gate [{mt.spec_summary(spec2)} T={T}]", e < 1e-13, f"rel {e:.2e}")
    # all options off is plain attention too
    spec = {"heads": 3, "head_dim": 4}
    q, k, v = (torch.randn(2, 3, 7, 4, generator=gen, dtype=dt) for _ in range(3))
    e = rel(mt.mta_attention(spec, q, k, v, {}), plain_causal_attention(q, k, v))
    check("all-off spec == causal attention", e < 1e-13, f"rel {e:.2e}")

    # 2. explicit loops, random non-identity weights ------------------------------------------
    n_loop = 0
    cases = []
    for pad in ("both", "left", "right"):
        for opts in ("kq_pre", "kq_post", "kq_pre+kq_post", "all"):
            cases.append((pad, opts))
    for idx, (pad, opts) in enumerate(cases):
        H = [1, 2, 3, 4][idx % 4]
        D = int(rng.integers(1, 5))
        B = int(rng.integers(1, 3))
        T = [1, 2, 3, 5, 6][idx % 5]
        cq = int(rng.integers(1, 5))
        ck = int(rng.integers(1, 6))
        if pad == "both" and ck % 2 == 0:
            ck += 1
        conv = {"q": cq, "k": ck, "pad_key": pad}
        spec = {"heads": H, "head_dim": D}
        if "kq_pre" in opts or opts == "all":
            spec["kq_pre"] = dict(conv)
        if "kq_post" in opts or opts == "all":
            spec["kq_post"] = {"q": int(rng.integers(1, 4)), "k": ck, "pad_key": pad}
        if opts == "all":
            divs = [d for d in range(1, H + 1) if H % d == 0]
            spec.update(head_pre={"group": int(rng.choice(divs))}, head_post={"group": int(rng.choice(divs))},
                        norm=True, depth_scale_layer=int(rng.integers(0, 10)), gate=True)
        params = mt.random_params(spec, gen, dt)
        q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=dt) for _ in range(3))
        got = mt.mta_attention(spec, q, k, v, params)
        ref = loop_mta(spec, q.numpy(), k.numpy(), v.numpy(), {n: p.numpy() for n, p in params.items()})
        e = rel(got, torch.from_numpy(ref))
        n_loop += 1
        check(f"loop reference [{mt.spec_summary(spec)} B={B} T={T}]", e < 1e-12, f"rel {e:.2e}")

    # the conv alone, against loops, on a non-causal random matrix (tests the full index map)
    for pad in ("both", "left", "right"):
        H, T, cq, ck = 2, 7, 3, 5
        x = torch.randn(1, H, T, T, generator=gen, dtype=dt)
        w = torch.randn(H, cq, ck, generator=gen, dtype=dt)
        c = {"q": cq, "k": ck, "pad_key": pad}
        o = mt.key_offset(c)
        ref = torch.zeros_like(x)
        for h, i, j, a, cc in itertools.product(range(H), range(T), range(T), range(cq), range(ck)):
            ii, jj = i - (cq - 1) + a, j - o + cc
            if 0 <= ii < T and 0 <= jj < T:
                ref[0, h, i, j] += w[h, a, cc] * x[0, h, ii, jj]
        e = rel(mt.kq_conv(x, w, c), ref)
        check(f"kq_conv index map pad={pad}", e < 1e-14, f"rel {e:.2e}")
    # a single tap moves values: w[h, a, c] = 1 reads x[i-(cq-1)+a, j-o+c]
    x = torch.arange(36, dtype=dt).reshape(1, 1, 6, 6)
    w = torch.zeros(1, 3, 5, dtype=dt)
    w[0, 0, 4] = 1.0  # a = 0, c = 4: reads x[i-2, j-2+4] = x[i-2, j+2] with pad both (o = 2)
    y = mt.kq_conv(x, w, {"q": 3, "k": 5, "pad_key": "both"})
    check("kq_conv single tap", float(y[0, 0, 3, 1]) == float(x[0, 0, 1, 3]) and float(y[0, 0, 1, 1]) == 0.0
          and float(y[0, 0, 5, 4]) == 0.0 and float(y[0, 0, 5, 3]) == float(x[0, 0, 3, 5]))

    # 3. head mixing convention ---------------------------------------------------------------
    H, g = 6, 3
    x = torch.randn(2, H, 4, 4, generator=gen, dtype=dt)
    M = torch.randn(H // g, g, g, generator=gen, dtype=dt)
    ref = torch.zeros_like(x)
    for G, xx, y in itertools.product(range(H // g), range(g), range(g)):
        ref[:, G * g + xx] += M[G, xx, y] * x[:, G * g + y]
    check("head_mix: C'[G*g+x] = sum_y M[G,x,y] C[G*g+y]", rel(mt.head_mix(x, M), ref) < 1e-15)
    # released code: new[x] = sum_y K[G,y,x] old[y]  ==  head_mix with M = K^T
    K = M
    ref2 = torch.zeros_like(x)
    for G, xx, y in itertools.product(range(H // g), range(g), range(g)):
        ref2[:, G * g + xx] += K[G, y, xx] * x[:, G * g + y]
    check("head_post: released head_kernel K == M with axes swapped",
          rel(mt.head_mix(x, K.transpose(1, 2)), ref2) < 1e-15)
    # g = H is a dense H x H mix
    Md = torch.randn(1, H, H, generator=gen, dtype=dt)
    check("head_mix g=H is a dense mix", rel(mt.head_mix(x, Md), torch.einsum("xy,byij->bxij", Md[0], x)) < 1e-14)

    # depth scaling values
    check("depth scale l=0 is 0.8", abs(mt.depth_scale(0) - 0.8) < 1e-15)
    check("depth scale l=3", abs(mt.depth_scale(3) - (0.2 + 0.6 * math.exp(-0.9))) < 1e-15)

    # 4. gradcheck ----------------------------------------------------------------------------
    for i in range(4):
        spec = mt.random_spec(rng, heads=[2, 4, 3, 1][i], head_dim=3, p_on=1.0 if i < 2 else 0.6)
        T, B = [4, 2, 1, 5][i], 1
        params = mt.random_params(spec, gen, dt)
        names = list(params)
        leaves = [torch.randn(B, spec["heads"], T, spec["head_dim"], generator=gen, dtype=dt, requires_grad=True)
                  for _ in range(3)] + [params[n].clone().requires_grad_(True) for n in names]

        def f(*xs):
            return mt.mta_attention(spec, xs[0], xs[1], xs[2], dict(zip(names, xs[3:])))

        ok = torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False)
        check(f"gradcheck [{mt.spec_summary(spec)} T={T}]", ok)

    # 5. forward_backward ---------------------------------------------------------------------
    spec = {"heads": 4, "head_dim": 8, "kq_pre": {"q": 6, "k": 11, "pad_key": "both"}, "head_pre": {"group": 2},
            "kq_post": {"q": 6, "k": 11, "pad_key": "both"}, "head_post": {"group": 4}, "norm": True,
            "depth_scale_layer": 3, "gate": True}
    B, H, T, D = 2, 4, 20, 8
    tens = {n: torch.randn(B, H, T, D, generator=gen, dtype=dt) for n in ("q", "k", "v", "dout")}
    tens.update(mt.random_params(spec, gen, dt))
    out64, g64 = mt.forward_backward(spec, tens)
    want = ["grad_q", "grad_k", "grad_v"] + ["grad_" + n for n in mt.param_shapes(spec)]
    check("forward_backward gradient names", sorted(g64) == sorted(want), str(sorted(g64)))
    shapes_ok = all(tuple(g64["grad_" + n].shape) == tuple(tens[n].shape) for n in ["q", "k", "v"] + list(mt.param_shapes(spec)))
    check("forward_backward gradient shapes", shapes_ok)
    check("forward_backward float64 dtype", out64.dtype == torch.float64 and g64["grad_q"].dtype == torch.float64)
    t32 = {n: x.float() for n, x in tens.items()}
    out32, g32 = mt.forward_backward(spec, t32)
    check("forward_backward float32 dtype", out32.dtype == torch.float32)
    errs = [rel(out32, out64)] + [rel(g32[n], g64[n]) for n in want]
    check("float32 close to float64", max(errs) < 1e-4, f"max rel {max(errs):.2e}")
    nod = {n: x for n, x in tens.items() if n != "dout"}
    o2, g2 = mt.forward_backward(spec, nod)
    check("forward_backward without dout", g2 == {} and rel(o2, out64) == 0.0)
    # numpy input
    o3, _ = mt.forward_backward(spec, {n: x.numpy() for n, x in nod.items()})
    check("forward_backward numpy input", rel(o3, out64) == 0.0)

    # 6. st.py ---------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.safetensors")
        data = {"a": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32),
                "b": np.random.default_rng(1).standard_normal((5,)),
                "c": np.array([1.5], dtype=np.float32), "e": np.zeros((0, 3), dtype=np.float32),
                "s": np.array(2.0, dtype=np.float64)}
        st.write(p, data, metadata={"format": "pt", "n": 3})
        back, meta = st.read_with_metadata(p)
        ok = all(back[n].dtype == data[n].dtype and back[n].shape == data[n].shape and np.array_equal(back[n], data[n])
                 for n in data) and set(back) == set(data) and meta == {"format": "pt", "n": "3"}
        check("st round trip F32/F64/empty/scalar + metadata", ok)
        raw = open(p, "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        h = json.loads(raw[8:8 + n])
        check("st layout: header length, alignment, offsets",
              n % 8 == 0 and h["a"]["dtype"] == "F32" and h["b"]["dtype"] == "F64"
              and h["a"]["data_offsets"] == [0, 96] and h["b"]["data_offsets"] == [96, 136]
              and len(raw) == 8 + n + h["s"]["data_offsets"][1])
        x = np.array([1.0, -2.5, 3.140625, 65504.0], dtype=np.float32)
        st.write(p, {"h": x.astype(np.float16), "bf": x}, dtypes={"bf": "BF16"})
        back = st.read(p)
        check("st F16 read", back["h"].dtype == np.float16 and np.array_equal(back["h"].astype(np.float32), x))
        check("st BF16 write/read", back["bf"].dtype == np.float32
              and np.allclose(back["bf"], x, rtol=1e-2) and back["bf"][1] == -2.5)
        st.write(p, {"i": np.arange(6, dtype=np.int32).reshape(2, 3)})
        back = st.read(p)
        check("st I32", back["i"].dtype == np.int32 and back["i"][1, 2] == 5)

    passed = sum(RESULTS)
    failed = len(RESULTS) - passed
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
