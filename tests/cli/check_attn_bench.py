#!/usr/bin/env python3
"""bench/attn_gpu.py's goals column, without a GPU: each issue-5 goal is reported met exactly when the
ratio is at or below it, the toy config has no time goal, and the script parses its arguments (--help)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import attn_gpu  # noqa: E402


def main():
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
    print("attn bench goals column: ok" if not bad else "attn bench goals column: FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
