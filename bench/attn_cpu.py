#!/usr/bin/env python3
"""CPU benchmark of one MTA attention layer: mta against the same op in PyTorch (materialized, the
paper's approach), same thread count, in one run.

    /usr/bin/python3 bench/attn_cpu.py [--mta build/src/mta] [--threads N] [--seqs 256,1024]

For each configuration of configs/attn/ (standard, kq-only, toy, paper-lm; B=1, H=4, D=64) and each T,
prints forward and forward+backward medians of both and the speed-up (PyTorch time / mta time) as a
markdown table, ready for bench/RESULTS.md. Run with Debian's /usr/bin/python3 (python3-torch).
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "oracle"))
import mta_torch as mt  # noqa: E402

CONFIGS = ["standard", "kq-only", "toy", "paper-lm"]


def median_ms(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def torch_times(spec, B, T, reps, warmup):
    H, D = spec["heads"], spec["head_dim"]
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    params = mt.identity_params(spec, torch.float32)
    params = {n: (p + 0.1 * torch.randn(p.shape, generator=g)).requires_grad_(True) for n, p in params.items()}
    leaves = [x.requires_grad_(True) for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            mt.mta_attention(spec, q, k, v, params)

    def fwd_bwd():
        out = mt.mta_attention(spec, q, k, v, params)
        torch.autograd.grad(out, leaves + list(params.values()), grad_outputs=dout)

    return median_ms(fwd, reps, warmup), median_ms(fwd_bwd, reps, warmup)


def mta_times(binary, spec_path, B, T, reps, warmup, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([binary, "bench", "attn", "--spec", str(spec_path), "--batch", str(B), "--seq", str(T),
                          "--reps", str(reps), "--warmup", str(warmup)], env=env, check=True, capture_output=True,
                         text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    return j["fwd_ms"], j["fwd_bwd_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mta", default=str(ROOT / "build" / "src" / "mta"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seqs", default="256,1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# CPU attention benchmark: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, B={args.batch}, median of {args.reps}")
    print("| config | T | mta fwd ms | torch fwd ms | fwd speed-up | mta fwd+bwd ms | torch fwd+bwd ms | fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        path = ROOT / "configs" / "attn" / f"{name}.json"
        spec = json.loads(path.read_text())
        for T in (int(t) for t in args.seqs.split(",")):
            mf, mfb = mta_times(args.mta, path, args.batch, T, args.reps, args.warmup, args.threads)
            tf, tfb = torch_times(spec, args.batch, T, args.reps, args.warmup)
            print(f"| {name} | {T} | {mf:.2f} | {tf:.2f} | {tf / mf:.2f}x | {mfb:.2f} | {tfb:.2f} | {tfb / mfb:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
