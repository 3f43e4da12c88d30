#!/usr/bin/env python3
"""The attention-layer benches without a GPU: bench/attn_gpu.py's goals column (each issue-5 goal is
reported met exactly when the ratio is at or below it, the toy config has no time goal; the script
parses its arguments), its timer's warm-up (on a stand-in for torch.cuda), and `mta bench attn --forward-only` on the CPU (fwd_ms timed, the backward's
fields null; without the flag both are numbers)."""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import attn_gpu  # noqa: E402


def bench_attn(mta, spec_path, *extra):
    r = subprocess.run([mta, "bench", "attn", "--device", "cpu", "--spec", spec_path, "--batch", "1", "--seq", "24",
                        "--reps", "1", "--warmup", "0", *extra], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"mta bench attn {' '.join(extra)} failed: {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_forward_only(mta):
    spec = {"heads": 2, "head_dim": 8, "kq_pre": {"q": 2, "k": 3, "pad_key": "both"}, "head_post": {"group": 2}}
    with tempfile.TemporaryDirectory() as d:
        path = str(pathlib.Path(d) / "spec.json")
        pathlib.Path(path).write_text(json.dumps(spec))
        fwd = bench_attn(mta, path, "--forward-only")
        both = bench_attn(mta, path)
    problems = []
    if not (isinstance(fwd["fwd_ms"], float) and fwd["fwd_ms"] > 0 and fwd["fwd_bwd_ms"] is None):
        problems.append(f"--forward-only: {fwd}")
    if not (isinstance(both["fwd_bwd_ms"], float) and both["fwd_bwd_ms"] > 0):
        problems.append(f"without --forward-only: {both}")
    for p in problems:
        print("bench attn:", p)
    return not problems


class _FakeCuda:
    """torch.cuda's timing surface on the CPU: events read the wall clock."""
    class Event:
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    @staticmethod
    def synchronize():
        pass


def check_warmup():
    """cuda_ms warms up for at least attn_gpu.WARM_MS (at least `warmup` calls) before the timed reps,
    and not at all with warmup = 0."""
    real = attn_gpu.torch
    attn_gpu.torch = type("FakeTorch", (), {"cuda": _FakeCuda})
    try:
        calls = []

        def op():
            calls.append(1)
            time.sleep(0.005)

        ms = attn_gpu.cuda_ms(op, reps=3, warmup=2)
        warm = len(calls) - 3
        calls.clear()
        attn_gpu.cuda_ms(op, reps=3, warmup=0)
        cold = len(calls)
    finally:
        attn_gpu.torch = real
    problems = []
    if not (warm >= 2 and warm * 5.0 >= 0.8 * attn_gpu.WARM_MS and warm <= 2 + attn_gpu.WARM_MS / 5.0 + 5):
        problems.append(f"warm-up of {warm} calls of 5 ms for WARM_MS = {attn_gpu.WARM_MS}")
    if cold != 3:
        problems.append(f"warmup = 0 made {cold} calls for 3 reps")
    if not 4.0 <= ms <= 50.0:
        problems.append(f"a 5 ms call timed at {ms} ms")
    for p in problems:
        print("cuda_ms:", p)
    return not problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mta", help="the mta binary (also checks `mta bench attn --forward-only` on the CPU)")
    args = ap.parse_args()
    cell = attn_gpu.goal_cell
    cases = [
        (("kq-only", 2.5, 1.2), "<= 2.5x met / <= 1.5x met"),
        (("kq-only", 2.51, 1.2), "<= 2.5x not met / <= 1.5x met"),
        (("paper-lm", 5.9, 1.6), "<= 6x met / <= 1.5x not met"),
        (("head-mix", 14.6, 1.01), "<= 2x not met / <= 1.5x met"),
        (("toy", 3.5, 1.2), "- / <= 1.5x met"),
    ]
    bad = [(args, cell(*args), want) for args, want in cases if cell(*args) != want]
    for args, got, want in bad:
        print(f"goal_cell{args} = {got!r}, want {want!r}")
    assert set(attn_gpu.TIME_GOALS) | {"toy"} == set(attn_gpu.CONFIGS), "every config but the toy has a goal"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "attn_gpu.py"), "--help"], capture_output=True, text=True)
    if r.returncode != 0 or "--max-materialized-t" not in r.stdout:
        print("attn_gpu.py --help failed:", r.stderr)
        return 1
    # A missing binary, and one still compressed as gpu-pack.sh ships it: one line naming the path (and
    # env.sh, which unpacks it), a non-zero exit, before any GPU work.
    with tempfile.TemporaryDirectory() as d:
        packed = pathlib.Path(d) / "mta"
        pathlib.Path(str(packed) + ".xz").write_bytes(b"")
        for path, want in ((pathlib.Path(d) / "none", "no mta binary at"), (packed, "source .device/env.sh first")):
            r = subprocess.run([sys.executable, str(ROOT / "bench" / "attn_gpu.py"), "--mta", str(path)],
                               capture_output=True, text=True)
            err = r.stderr.strip()
            if r.returncode == 0 or want not in err or str(path) not in err or "\n" in err:
                print(f"attn_gpu.py --mta {path}: rc {r.returncode}, stderr {err!r}")
                return 1
    print("attn bench goals column: ok" if not bad else "attn bench goals column: FAILED")
    warm_ok = check_warmup()
    print("attn_gpu.cuda_ms warm-up: ok" if warm_ok else "attn_gpu.cuda_ms warm-up: FAILED")
    fwd_ok = check_forward_only(args.mta) if args.mta else True
    if args.mta:
        print("mta bench attn --forward-only: ok" if fwd_ok else "mta bench attn --forward-only: FAILED")
    return 1 if bad or not warm_ok or not fwd_ok else 0


if __name__ == "__main__":
    sys.exit(main())
