#!/usr/bin/env python3
"""GPU benchmark of one attention layer (issue 5): PyTorch SDPA flash, the materialized MTA in PyTorch
(the paper's approach: T x T scores, conv2d, softmax, head mixing) and mta's fused kernels
(`mta bench attn --device cuda --impl fused`; where they do not cover a configuration yet, mta's
materialized op, `--impl materialized`), side by side in one run.

    python3 bench/attn_gpu.py [--mta .device/mta] [--seqs 2048,4096,8192,16384] [--dims 64,128]

B=2, H=16 by default. Configurations (docs/mta-semantics.md): kq-only (6x11 pre), toy (2x9 pre),
paper LM (6x11 pre and post, g=16 pre and post, norm, gate), head-mix only (g=16 pre and post).
For each: forward and backward times (CUDA events over back-to-back calls, after at least 100 ms of
warm-up calls) and peak device memory; the ratios of the fused path to SDPA on the same shape are the
figure of merit (goals: kq-only <= 2.5x, paper LM <= 6x, head-mix <= 2x forward+backward; memory <= 1.5x
SDPA). The "mta path" column says which path ran; where PyTorch's materialized path runs out of
memory, its columns say OOM.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "oracle"))
import mta_torch as mt  # noqa: E402
import mta_binary  # noqa: E402  (bench/, the script's own folder)

CONV = {"q": 6, "k": 11, "pad_key": "both"}
CONFIGS = {
    "kq-only": {"kq_pre": CONV},
    "toy": {"kq_pre": {"q": 2, "k": 9, "pad_key": "both"}},
    "paper-lm": {"kq_pre": CONV, "head_pre": {"group": 16}, "kq_post": CONV, "head_post": {"group": 16},
                 "norm": True, "gate": True},
    "head-mix": {"head_pre": {"group": 16}, "head_post": {"group": 16}},
}


# Issue 5's goals: mta's forward + backward time over SDPA's on the same shape (none for the toy config),
# and its peak memory over SDPA's.
TIME_GOALS = {"kq-only": 2.5, "paper-lm": 6.0, "head-mix": 2.0}
MEMORY_GOAL = 1.5


def goal_cell(name, time_ratio, mem_ratio):
    """The goals column of one row: each goal with whether the row meets it."""
    def one(ratio, goal):
        return f"<= {goal:g}x {'met' if ratio <= goal else 'not met'}"
    t = one(time_ratio, TIME_GOALS[name]) if name in TIME_GOALS else "-"
    return f"{t} / {one(mem_ratio, MEMORY_GOAL)}"


# With warm-up calls, they run for at least this long (each waited for), so that an idle GPU's clocks have
# ramped up before the timed calls (session 20: with 2 warm-up calls, SDPA's backward at T = 2048, the
# first op after an idle gap, read 0.21 to 0.54 ms from run to run). `mta bench attn` warms up the same way.
WARM_MS = 100.0
MAX_WARM_CALLS = 100000


def cuda_ms(fn, reps, warmup):
    """Device time per call: `reps` calls back to back between two events, divided by reps. (Timing each
    call between its own events, as this did first, counted the host's launch gaps too: autograd's
    ~0.1 ms per backward call made SDPA's 0.3 ms backward read anywhere from 0.27 to 0.54 ms.) Warm-up:
    at least `warmup` calls and, when warmup > 0, at least WARM_MS of them."""
    t0 = time.perf_counter()
    i = 0
    while i < warmup or (warmup > 0 and i < MAX_WARM_CALLS and (time.perf_counter() - t0) * 1e3 < WARM_MS):
        fn()
        if i >= warmup:
            torch.cuda.synchronize()  # the wall clock then follows the device
        i += 1
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def torch_case(kind, spec, B, T, reps, warmup):
    """(fwd_ms, bwd_ms, peak_bytes) of SDPA (kind 'sdpa') or the materialized MTA (kind 'materialized')."""
    H, D = spec["heads"], spec["head_dim"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    params = {}
    if kind == "materialized":
        params = {n: (p + 0.05 * torch.randn(p.shape, dtype=torch.float64)).to("cuda", torch.bfloat16).requires_grad_(True)
                  for n, p in mt.identity_params(spec, torch.float64).items()}

    def forward():
        if kind == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return mt.mta_attention(spec, q, k, v, params)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fwd = cuda_ms(forward, reps, warmup)
    out = forward()
    wrt = leaves + list(params.values())
    bwd = cuda_ms(lambda: torch.autograd.grad(out, wrt, grad_outputs=dout, retain_graph=True), reps, warmup)
    peak = torch.cuda.max_memory_allocated() - base + sum(x.numel() * x.element_size() for x in (q, k, v, dout))
    del out
    torch.cuda.empty_cache()
    return fwd, bwd, peak


def mta_case(binary, spec, B, T, reps, warmup):
    """(path, fwd_ms, bwd_ms, bytes) of mta's GPU op: the fused kernels where they cover the spec, else
    mta's materialized op (float32, row blocks)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        for impl in ("fused", "materialized"):
            r = subprocess.run([binary, "bench", "attn", "--device", "cuda", "--impl", impl, "--spec", f.name,
                                "--batch", str(B), "--seq", str(T), "--reps", str(reps), "--warmup", str(warmup)],
                               capture_output=True, text=True)
            if impl == "fused" and r.returncode == 2 and "do not cover" in r.stderr:
                continue
            if r.returncode != 0:
                raise RuntimeError(f"mta bench attn --impl {impl} failed: {r.stderr.strip()}")
            j = json.loads(r.stdout.strip().splitlines()[-1])
            return impl, j["fwd_ms"], j["bwd_ms"], j["device_bytes"]
    finally:
        pathlib.Path(f.name).unlink()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mta", default=str(ROOT / ".device" / "mta"))
    ap.add_argument("--seqs", default="2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-materialized-t", type=int, default=8192,
                    help="skip the materialized path above this T (its T x T tensors: ~74 GB at 16384)")
    args = ap.parse_args()
    mta_binary.require(args.mta, __file__)
    B, H = args.batch, args.heads
    print(f"# attention layer, {torch.cuda.get_device_name()}, torch {torch.__version__}, B={B}, H={H}, bf16, "
          f"mean of {args.reps} back-to-back calls; times in ms, memory in GB; ratios = mta / SDPA; mta path = fused kernels, or "
          f"mta's materialized op where they do not cover the config yet")
    print("| config | D | T | SDPA fwd / bwd | SDPA mem | PyTorch materialized fwd / bwd | its mem | mta path |"
          " mta fwd / bwd | mta mem | mta/SDPA f+b | mta/SDPA mem | goals: f+b / mem |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for D in map(int, args.dims.split(",")):
        for T in map(int, args.seqs.split(",")):
            sdpa = torch_case("sdpa", {"heads": H, "head_dim": D}, B, T, args.reps, args.warmup)
            for name in args.configs.split(","):
                spec = dict(CONFIGS[name], heads=H, head_dim=D)
                if T <= args.max_materialized_t:
                    try:
                        m = torch_case("materialized", spec, B, T, max(2, args.reps // 3), 1)
                        mat = f"{m[0]:.2f} / {m[1]:.2f} | {m[2] / 1e9:.2f}"
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        mat = "OOM | -"
                else:
                    mat = "skipped | -"
                path, f_ms, b_ms, nbytes = mta_case(args.mta, spec, B, T, args.reps, args.warmup)
                time_ratio, mem_ratio = (f_ms + b_ms) / (sdpa[0] + sdpa[1]), nbytes / sdpa[2]
                fcols = (f"{path} | {f_ms:.2f} / {b_ms:.2f} | {nbytes / 1e9:.2f} | {time_ratio:.2f}x | "
                         f"{mem_ratio:.2f}x | {goal_cell(name, time_ratio, mem_ratio)}")
                print(f"| {name} | {D} | {T} | {sdpa[0]:.2f} / {sdpa[1]:.2f} | {sdpa[2] / 1e9:.2f} | {mat} | {fcols} |",
                      flush=True)


if __name__ == "__main__":
    main()
