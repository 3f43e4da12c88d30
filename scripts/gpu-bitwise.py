#!/usr/bin/env python3
"""Two `mta` binaries on the same `mta attn` cases, their outputs compared bit for bit.

For a kernel change that should not change results (a different load pattern, the same products in
the same order), this is a stronger check than a tolerance: every tensor that the kernels compute
without atomics must come out identical. Tensors summed by atomics (dq, dk, the weight gradients
of the fused backward) may differ in their last bits from the order of the additions; they are
listed with their largest difference, relative to their largest magnitude, for reading.

    python3 scripts/gpu-bitwise.py --new .device/mta --base .device/mta_base \\
        --cases DIR [--make-kq-pre N] [--device cuda] [--exact out]

DIR holds the cases of `tests/oracle/check_attn.py --keep DIR` (caseNNN/SPEC.json, IN.safetensors), or
with --make-kq-pre N this script first writes N random cases of kq_pre alone there (flash_mta.cu's
path: H 1..16, D 64 / 128, cq 1..8, ck 1..15, every pad, T 1..700), where `out` and `grad_v` come
without atomics (--exact out,grad_v). In the other fused paths dv is summed by atomics too.
Exits 1 when a tensor named in --exact differs, or a run fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "oracle"))
import st  # noqa: E402


def make_kq_pre_cases(folder, n, seed):
    import torch  # noqa: F401  (mta_torch's parameters)
    import mta_torch as mt
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        pad = ["both", "left", "right"][int(rng.integers(0, 3))]
        ck = int(rng.integers(1, 16))
        ck += pad == "both" and ck % 2 == 0
        spec = {"heads": int(rng.choice([1, 2, 4, 16])), "head_dim": int(rng.choice([64, 128])),
                "kq_pre": {"q": int(rng.integers(1, 9)), "k": ck, "pad_key": pad}}
        B, T = int(rng.integers(1, 3)), int(rng.choice([rng.integers(1, 20), rng.integers(20, 701)]))
        shape = (B, spec["heads"], T, spec["head_dim"])
        tens = {name: torch.randn(*shape, generator=gen, dtype=torch.float64) for name in ("q", "k", "v", "dout")}
        tens.update(mt.random_params(spec, gen, torch.float64))
        d = os.path.join(folder, f"case{i:03d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "SPEC.json"), "w") as f:
            json.dump(spec, f)
        st.write(os.path.join(d, "IN.safetensors"), {k: v.numpy().astype(np.float32) for k, v in tens.items()})


def run(mta, case_dir, device, out_path):
    cmd = [mta, "attn", "--spec", os.path.join(case_dir, "SPEC.json"), "--in",
           os.path.join(case_dir, "IN.safetensors"), "--out", out_path, "--device", device]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"{mta} failed on {case_dir}: {p.stderr.strip()[:300]}")
    return st.read(out_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--cases", required=True, help="a --keep folder of check_attn.py")
    ap.add_argument("--make-kq-pre", type=int, default=0, metavar="N",
                    help="first write N random kq_pre-only cases into --cases")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--exact", default="out", help="tensors that must be identical (comma-separated)")
    args = ap.parse_args()
    if args.make_kq_pre:
        make_kq_pre_cases(args.cases, args.make_kq_pre, args.seed)
    exact = {n for n in args.exact.split(",") if n}
    if not os.path.isdir(args.cases):
        sys.exit(f"gpu-bitwise: no folder {args.cases} (give check_attn.py --keep's folder, or --make-kq-pre N)")
    for b in (args.new, args.base):
        if not (os.path.isfile(b) and os.access(b, os.X_OK)):
            sys.exit(f"gpu-bitwise: no executable mta at {b}")
    cases = sorted(d for d in os.listdir(args.cases) if d.startswith("case"))
    if not cases:
        sys.exit(f"gpu-bitwise: no caseNNN folders in {args.cases}")
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for c in cases:
            d = os.path.join(args.cases, c)
            try:
                a = run(args.new, d, args.device, os.path.join(tmp, "new.safetensors"))
                b = run(args.base, d, args.device, os.path.join(tmp, "base.safetensors"))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"{c}: FAIL {e}")
                bad += 1
                continue
            parts = []
            for name in sorted(set(a) & set(b)):
                x, y = np.asarray(a[name]), np.asarray(b[name])
                if x.shape != y.shape:
                    parts.append(f"{name} shape {x.shape} vs {y.shape}")
                    bad += 1
                    continue
                if x.tobytes() == y.tobytes():
                    parts.append(f"{name} ==")
                    continue
                scale = max(float(np.max(np.abs(y.astype(np.float64)))), 1e-30)
                rel = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) / scale
                flag = "DIFFERS" if name in exact else "differs"
                bad += name in exact
                parts.append(f"{name} {flag} {rel:.1e}")
            print(f"{c}: " + ", ".join(parts))
    print(f"gpu-bitwise: {len(cases)} cases, {bad} failures")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
