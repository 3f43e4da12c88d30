#!/usr/bin/python3
"""Oracle test of `mta attn` against the independent PyTorch implementation (mta_torch.py).

    /usr/bin/python3 tests/oracle/check_attn.py --mta build/src/mta [--cases N] [--seed S] [--keep DIR] [-v]

For each random case: write SPEC.json and IN.safetensors (q, k, v, every enabled parameter, and
`dout` in most cases) into a temporary folder, run `MTA attn --spec SPEC.json --in IN.safetensors
--out OUT.safetensors`, require exit status 0, then compare OUT with float64 torch autograd run on the
same inputs (the float32 values upcast):
  - OUT holds exactly `out` (+ grad_q, grad_k, grad_v, grad_<param> for every enabled param when
    dout is given), each with the shape of its input and the input's dtype;
  - every tensor: ||a - b|| / max(||b||, tiny) <= tol, tol = 1e-5 (F32 inputs) or 1e-10 (F64).
Conditioning: the group norm makes some gradients ill-posed in fp32 (see condition_rules); the
worst such combinations are not generated, and for the rest the tolerance of a tensor is widened to
10x the error torch itself makes computing that tensor in fp32 (`tolerances`), printed as
"[ill-conditioned: tol widened]". On well-conditioned tensors that error is ~1e-7, far below 1e-5.
Cases cover every option on and off independently (plus all-on and all-off cases), the three pad
modes, every group size dividing H for H in {1,2,3,4,6,8}, cq 1..6, ck 1..11, T 1..64 (also T
smaller than the kernels), D 1..32, B 1..3, and 3 cases with F64 inputs.
Prints one line per case and `N passed, M failed`; exits 1 if any case failed.

    check_attn.py --mta .device/mta --device cuda [--cases N]     (on the GPU machine)

runs `mta attn --device cuda` instead, on the cases an outside checker of issue 5 would draw: H in
{1, 2, 4, 8, 12, 16} (most often 16), D 64 or 128 (the fused kernels' sizes; a few other D, which take
the materialized op), cq 1..8, ck 1..15, every pad mode and group size, T 1..200 (not multiples of
the 16-row tiles, and T no larger than the kernels; 2 cases in 40 T 500..1100), random
non-identity weights and F32 inputs that are not bf16-exact. Each output says which path ran
(`impl`): the materialized op computes in fp32 or fp64 and is held to the tolerances above; the fused
kernels compute in bf16 and are held to "bf16 tolerance", defined per tensor from the same float64
reference (`bf16_tolerances`): the error that rounding q, k, v and dout, or the core's output and its
gradient, to bf16 alone causes (e_bf, the bf16 baseline: what any implementation with bf16 inputs and
outputs carries in), times FUSED_FACTOR, with a floor of TOL_FUSED_FLOOR and the fp32 conditioning
rule on top. Each fused line prints the worst error / e_bf ratio, so a drift shows before it fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mta_torch as mt  # noqa: E402
import st  # noqa: E402

TOL_F32 = 1e-5
TOL_F64 = 1e-10
TINY = 1e-30
COND_FACTOR = 10.0        # allowed multiple of torch's own fp32 error on ill-conditioned tensors
EPS_RATIO = 2.0 ** -53 / 2.0 ** -24
HS = [1, 2, 3, 4, 6, 8]
PADS = ["both", "left", "right"]
# --device cuda (the fused bf16 kernels): see the docstring and bf16_tolerances
HS_CUDA = [16, 16, 16, 8, 12, 4, 2, 1]
FUSED_FACTOR = 8.0
TOL_FUSED_FLOOR = 1.5e-2


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def condition_rules(spec, rng):
    """Keep the gradients well conditioned in fp32 (the group norm makes some of them ill-posed).

    The norm divides each output row by its RMS, so a parameter that only rescales a whole row has an
    analytic gradient of order eps = 1e-5 that fp32 computes as the difference of O(1) terms: the
    relative error of ANY fp32 implementation (torch included) is then 1e-4..1e-1. That happens for
    head_post with group 1 (one scale per head), kq_post 1x1, T = 1 with kq_post / head_post (every
    row of A3 is a scalar), and D = 1..3 (O / sqrt(O^2 + eps) ~ sign(O)). With norm on, these are
    avoided here; what ill-conditioning remains is measured per tensor (see `tolerance`)."""
    if not spec.get("norm"):
        return
    H = spec["heads"]
    if spec["head_dim"] < 4:
        spec["head_dim"] = int(rng.integers(4, 33))
    if "head_post" in spec and spec["head_post"]["group"] == 1:
        if H == 1:
            del spec["norm"]
            return
        divs = [d for d in divisors(H) if d > 1]
        spec["head_post"]["group"] = divs[int(rng.integers(0, len(divs)))]
    c = spec.get("kq_post")
    if c and c["q"] == 1 and c["k"] == 1:
        c["q"] = int(rng.integers(2, 7))


def conditioned_t(spec, T, kmax, rng):
    """T redrawn from 2 .. max(kmax, 3) where T = 1 would be ill-conditioned under the norm (every row of
    A3 a scalar with kq_post / head_post: see condition_rules); else T as drawn."""
    if spec.get("norm") and T == 1 and ("kq_post" in spec or "head_post" in spec):
        return int(rng.integers(2, max(kmax, 3) + 1))
    return T


def draw_epilogue(spec, rng, p_on):
    """Norm, depth scaling and gate, each on with probability p_on."""
    if rng.random() < p_on:
        spec["norm"] = True
    if rng.random() < p_on:
        spec["depth_scale_layer"] = int(rng.integers(0, 30))
    if rng.random() < p_on:
        spec["gate"] = True


def kernel_max(spec):
    """The largest convolution kernel extent of the spec (1 without convolutions)."""
    return max([spec[c]["q"] for c in ("kq_pre", "kq_post") if c in spec] +
               [spec[c]["k"] for c in ("kq_pre", "kq_post") if c in spec] + [1])


def make_cases(n, seed):
    """Deterministic list of case descriptions (spec, B, T, with_dout, f64, null_style)."""
    rng = np.random.default_rng(seed)
    cases = []
    # group sizes to cover: every (H, g) with g | H, used round-robin by the cases that mix heads
    hg = [(H, g) for H in HS for g in divisors(H)]
    for idx in range(n):
        H = HS[idx % len(HS)]
        kind = "random"
        if idx in (0, 7):
            kind = "all-off"
        elif idx in (1, 2, 13, 19, 26):
            kind = "all-on"
        p_on = {"random": 0.5, "all-off": 0.0, "all-on": 1.0}[kind]
        if kind == "all-on" or rng.random() < 0.5:
            H, _ = hg[(idx * 7) % len(hg)]
        D = int(rng.integers(1, 33))
        spec = {"heads": H, "head_dim": D}
        for name in ("kq_pre", "head_pre", "kq_post", "head_post"):
            if rng.random() < p_on:
                if name.startswith("kq"):
                    pad = PADS[(idx + (name == "kq_post")) % 3]
                    ck = int(rng.integers(1, 12))
                    if pad == "both" and ck % 2 == 0:
                        ck = ck + 1 if ck < 11 else ck - 1
                    spec[name] = {"q": int(rng.integers(1, 7)), "k": ck, "pad_key": pad}
                else:
                    # cycle deterministically through the divisors so every group size appears
                    divs = divisors(H)
                    spec[name] = {"group": divs[(idx + (name == "head_post")) % len(divs)]}
        draw_epilogue(spec, rng, p_on)
        B = int(rng.integers(1, 4))
        condition_rules(spec, rng)
        kmax = kernel_max(spec)
        r = rng.random()
        if r < 0.25:
            T = int(rng.integers(1, max(kmax, 2) + 1))  # T no larger than the kernels
        elif r < 0.35:
            T = 1
        else:
            T = int(rng.integers(1, 65))
        T = conditioned_t(spec, T, kmax, rng)
        with_dout = not (idx % 13 == 5)       # dout absent in a few cases
        f64 = idx in (3, 22, 41)              # F64 inputs
        null_style = rng.random() < 0.3       # disabled members written as null instead of absent
        cases.append(dict(spec=spec, B=B, T=T, with_dout=with_dout, f64=f64, null_style=null_style, kind=kind))
    return cases


def make_cuda_cases(n, seed):
    """The cases of --device cuda: the fused kernels' sizes (see the docstring), same fields."""
    rng = np.random.default_rng(seed + 7)
    cases = []
    for idx in range(n):
        H = HS_CUDA[idx % len(HS_CUDA)]
        kind = "all-on" if idx % 5 == 1 else "all-off" if idx == 6 else "random"
        p_on = {"random": 0.5, "all-off": 0.0, "all-on": 1.0}[kind]
        D = int(rng.choice([64, 128])) if rng.random() < 0.85 else int(rng.integers(4, 161))
        spec = {"heads": H, "head_dim": D}
        for name in ("kq_pre", "head_pre", "kq_post", "head_post"):
            if rng.random() < p_on:
                if name.startswith("kq"):
                    pad = PADS[int(rng.integers(0, 3))]
                    ck = int(rng.integers(1, 16))
                    if pad == "both" and ck % 2 == 0:
                        ck += 1
                    spec[name] = {"q": int(rng.integers(1, 9)), "k": ck, "pad_key": pad}
                else:
                    divs = divisors(H)
                    # the dense mix (g = H) half the time: the paper's layer
                    g = H if rng.random() < 0.5 else divs[int(rng.integers(0, len(divs)))]
                    spec[name] = {"group": g}
        draw_epilogue(spec, rng, p_on)
        B = int(rng.integers(1, 3))
        condition_rules(spec, rng)
        kmax = kernel_max(spec)
        r = rng.random()
        if r < 0.2:
            T = int(rng.integers(1, max(kmax, 2) + 1))  # T no larger than the kernels
        elif r < 0.3:
            T = 16 * int(rng.integers(1, 9)) + int(rng.choice([-1, 1]))  # one off a tile boundary
        else:
            T = int(rng.integers(1, 201))
        T = conditioned_t(spec, T, kmax, rng)
        if idx % 40 in (32, 35):  # a long sequence (H 16 or 8): many key tiles, the dq / dk atomics
            T, B = int(rng.integers(500, 1101)), 1
        with_dout = not (idx % 13 == 5)
        f64 = idx in (3, 29)  # F64 input: the materialized op in float64 on the GPU
        cases.append(dict(spec=spec, B=B, T=T, with_dout=with_dout, f64=f64, null_style=False, kind=kind))
    return cases


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), TINY))


def run_case(mta, idx, case, seed, keep=None, verbose=False, device="cpu"):
    """Returns (ok, line, details)."""
    spec = case["spec"]
    B, T = case["B"], case["T"]
    H, D = spec["heads"], spec["head_dim"]
    np_dtype = np.float64 if case["f64"] else np.float32
    gen = torch.Generator().manual_seed(seed * 100003 + idx)
    tens = {n: torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for n in ("q", "k", "v")}
    tens.update(mt.random_params(spec, gen, torch.float64))
    if case["with_dout"]:
        tens["dout"] = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    inputs = {n: x.numpy().astype(np_dtype) for n, x in tens.items()}

    spec_json = dict(spec)
    if case["null_style"]:
        for n in ("kq_pre", "head_pre", "kq_post", "head_post", "norm", "depth_scale_layer", "gate"):
            spec_json.setdefault(n, None)

    summary = f"case {idx:3d} [{mt.spec_summary(spec)} B={B} T={T}{' dout' if case['with_dout'] else ''}" \
              f"{' F64' if case['f64'] else ''}]"
    details = []
    with tempfile.TemporaryDirectory(prefix="mta_oracle_") as d:
        work = keep if keep else d
        if keep:
            work = os.path.join(keep, f"case{idx:03d}")
            os.makedirs(work, exist_ok=True)
        spec_path = os.path.join(work, "SPEC.json")
        in_path = os.path.join(work, "IN.safetensors")
        outdir = os.path.join(work, "outdir")
        os.makedirs(outdir, exist_ok=True)
        out_path = os.path.join(outdir, "OUT.safetensors")
        if os.path.exists(out_path):
            os.remove(out_path)
        with open(spec_path, "w") as f:
            json.dump(spec_json, f)
        st.write(in_path, inputs)
        cmd = [mta, "attn", "--spec", spec_path, "--in", in_path, "--out", out_path, "--device", device]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return False, f"FAIL {summary}: timed out", details
        except OSError as e:
            return False, f"FAIL {summary}: cannot run {mta}: {e}", details
        if p.returncode != 0:
            return False, f"FAIL {summary}: exit status {p.returncode}, stderr: {p.stderr.strip()[:500]}", details
        if not os.path.exists(out_path):
            return False, f"FAIL {summary}: exit 0 but no output file", details
        extra = sorted(set(os.listdir(outdir)) - {"OUT.safetensors"})
        if extra:
            details.append(f"leftover files in the output folder: {extra}")
        try:
            header, _ = st.read_header(out_path)
            got = st.read(out_path)
        except Exception as e:  # noqa: BLE001
            return False, f"FAIL {summary}: cannot read output: {e}", details

    # reference: float64 autograd on the same (possibly float32-rounded) inputs
    ref_in = {n: torch.from_numpy(a.astype(np.float64)) for n, a in inputs.items()}
    out, grads = mt.forward_backward(spec, ref_in, dtype=torch.float64)
    expected = {"out": out.numpy()}
    expected.update({n: g.numpy() for n, g in grads.items()})
    want_dtype = "F64" if case["f64"] else "F32"
    tols = tolerances(spec, ref_in, expected, case["f64"])
    impl = (header.get("__metadata__") or {}).get("impl", "?")
    fused = impl == "fused"
    if fused:
        tols = bf16_tolerances(spec, ref_in, expected, tols)
    if device == "cuda":
        summary += f" {impl}"

    header.pop("__metadata__", None)
    if set(got) != set(expected):
        details.append(f"tensor names: got {sorted(got)}, expected {sorted(expected)}")
    worst = 0.0
    worst_ratio = 0.0  # fused: the largest error / e_bf
    for name in sorted(expected):
        if name not in got:
            continue
        a, b = got[name], expected[name]
        if header[name]["dtype"] != want_dtype:
            details.append(f"{name}: dtype {header[name]['dtype']}, expected {want_dtype}")
        if tuple(a.shape) != tuple(b.shape):
            details.append(f"{name}: shape {list(a.shape)}, expected {list(b.shape)}")
            continue
        if not np.all(np.isfinite(a)):
            details.append(f"{name}: contains NaN/Inf")
            worst = float("inf")
            continue
        e = rel_err(a, b)
        worst = max(worst, e)
        tol, e32 = tols[name][:2]
        base = TOL_F64 if case["f64"] else TOL_F32
        msg = f"{name}: rel err {e:.3e} (tol {tol:.1e}), |ref| {np.linalg.norm(b):.3e}, torch fp32 err {e32:.1e}"
        if fused:
            e_bf = tols[name][2]
            worst_ratio = max(worst_ratio, e / max(e_bf, TINY))
            msg += f", bf16 baseline err {e_bf:.1e}"
            base = tol  # the bf16 tolerance is this tensor's own
        if tol > base:
            msg += " [ill-conditioned: tol widened]"
        if e > tol:
            diff = np.abs(a.astype(np.float64) - b)
            at = np.unravel_index(int(np.argmax(diff)), diff.shape)
            msg += f"; worst at {list(map(int, at))}: got {float(a[at]):.8g}, want {float(b[at]):.8g}"
            details.append(msg)
        elif verbose or tol > base:
            details.append("  " + msg)
    failed = any(not x.startswith("  ") for x in details)
    line = f"{'FAIL' if failed else 'ok  '} {summary}: max rel err {worst:.2e}"
    if fused:
        line += f", max err / bf16 baseline err {worst_ratio:.1f}"
    return not failed, line, details


def tolerances(spec, ref_in, expected, f64):
    """{tensor: (tol, e32)}. e32 is the relative error that torch itself makes computing the same
    tensor in float32 (a correct fp32 implementation with another summation order): a measure of
    how ill-conditioned that tensor is on this input. tol = max(1e-5, COND_FACTOR * e32) for F32,
    and the same scaled by eps64/eps32 (floor 1e-10) for F64 inputs. On well-conditioned tensors
    e32 ~ 1e-7 and the tolerance is the plain 1e-5."""
    in32 = {n: x.float() for n, x in ref_in.items()}
    if f64:  # conditioning of the computation alone: float64 vs float32 on the same rounded inputs
        o, g = mt.forward_backward(spec, {n: x.double() for n, x in in32.items()}, dtype=torch.float64)
        ref = {"out": o.numpy(), **{n: t.numpy() for n, t in g.items()}}
    else:
        ref = expected
    o32, g32 = mt.forward_backward(spec, in32, dtype=torch.float32)
    r32 = {"out": o32.numpy(), **{n: t.numpy() for n, t in g32.items()}}
    out = {}
    for name in expected:
        e32 = rel_err(r32[name], ref[name])
        if f64:
            out[name] = (max(TOL_F64, COND_FACTOR * e32 * EPS_RATIO), e32)
        else:
            out[name] = (max(TOL_F32, COND_FACTOR * e32), e32)
    return out


class _Bf16Interface(torch.autograd.Function):
    """Rounds a value to bf16 on the way forward and its gradient to bf16 on the way back: the core's
    output as kernels with bf16 outputs give it to the epilogue, and the epilogue's gradient as they
    take it back (FlashMix and flash_mta take dO in bf16)."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(torch.bfloat16).to(g.dtype)


def bf16_round(x):
    return _Bf16Interface.apply(x)


def bf16_tolerances(spec, ref_in, expected, tols):
    """{tensor: (tol, e32, e_bf)} for the fused kernels' output. e_bf: the larger relative error of two
    float64 evaluations, one on q, k, v and dout rounded to bf16 (the parameters as given), one with
    the core's output (step 7) rounded to bf16 before the epilogue and the epilogue's gradient rounded
    to bf16 on its way back into the core (with norm, depth scaling or gate): what kernels with bf16
    inputs and outputs carry in. The second matters for sums over every token that can cancel: the
    epilogue's weight gradients (grad_gate_b: 1-9% from the core's rounding alone on some random
    cases) and, behind a norm, whose gradient is nearly orthogonal to the core's output, the post-side
    mixing weights' (grad_head_post). The kernels round more than that (the softmax weights before
    P V, the gradients dS before dQ / dK, the logits to fp16 for the convolutions), so they are held to
    FUSED_FACTOR x e_bf, floor TOL_FUSED_FLOOR, and never below the fp32 conditioning tolerance (tols)."""
    rounded = {n: (x.to(torch.bfloat16).to(torch.float64) if n in ("q", "k", "v", "dout") else x)
               for n, x in ref_in.items()}
    runs = [mt.forward_backward(spec, rounded, dtype=torch.float64)]
    if any(mt._on(spec, n) for n in ("norm", "depth_scale_layer", "gate")):
        runs.append(mt.forward_backward(spec, ref_in, dtype=torch.float64, core_round=bf16_round))
    out = {}
    for name in expected:
        e_bf = 0.0
        for o, g in runs:
            rb = o.numpy() if name == "out" else g[name].numpy()
            e_bf = max(e_bf, rel_err(rb, expected[name]))
        tol32, e32 = tols[name]
        out[name] = (max(TOL_FUSED_FLOOR, FUSED_FACTOR * e_bf, tol32), e32, e_bf)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mta", required=True, help="path of the mta binary")
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=20250401)
    ap.add_argument("--only", type=int, nargs="*", help="run only these case indices")
    ap.add_argument("--keep", help="keep each case's files under this folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every tensor's error")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="run `mta attn --device DEVICE` (cuda: the fused kernels' cases, bf16 tolerances)")
    ap.add_argument("--cond-factor", type=float, default=COND_FACTOR,
                    help="on ill-conditioned tensors, allowed multiple of torch's own fp32 error (default %(default)s)")
    args = ap.parse_args()
    globals()["COND_FACTOR"] = args.cond_factor
    mta = os.path.abspath(args.mta)
    if not os.access(mta, os.X_OK):
        print(f"mta binary not found or not executable: {mta}")
        print("0 passed, 1 failed")
        return 1
    torch.set_num_threads(min(8, os.cpu_count() or 1))

    n = max(args.cases, 1)
    cases = make_cuda_cases(n, args.seed) if args.device == "cuda" else make_cases(n, args.seed)
    # coverage summary
    cov = {"kq_pre": 0, "head_pre": 0, "kq_post": 0, "head_post": 0, "norm": 0, "depth_scale_layer": 0, "gate": 0}
    pads, groups, small_T, no_dout, f64 = set(), set(), 0, 0, 0
    for c in cases:
        s = c["spec"]
        for k in cov:
            cov[k] += s.get(k) is not None
        for k in ("kq_pre", "kq_post"):
            if k in s:
                pads.add(s[k]["pad_key"])
                if c["T"] < max(s[k]["q"], s[k]["k"]):
                    small_T += 1
        for k in ("head_pre", "head_post"):
            if k in s:
                groups.add((s["heads"], s[k]["group"]))
        no_dout += not c["with_dout"]
        f64 += c["f64"]
    print(f"{len(cases)} cases; options on: {cov}; pad modes {sorted(pads)}; "
          f"(H, group) pairs {len(groups)}; T < kernel in {small_T}; without dout {no_dout}; F64 {f64}")

    passed = failed = 0
    for idx, case in enumerate(cases):
        if args.only and idx not in args.only:
            continue
        ok, line, details = run_case(mta, idx, case, args.seed, keep=args.keep, verbose=args.verbose,
                                     device=args.device)
        print(line)
        for dl in details:
            print("      " + dl)
        sys.stdout.flush()
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
