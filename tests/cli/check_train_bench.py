#!/usr/bin/env python3
"""bench/train_gpu.py's driver on the CPU (its smoke mode: no compile, no SDPA): three configs spread
over two worker queues, each config in its own process; the table lists them in the order given, with
numbers on both sides, and the fraction line pairs the MTA config with its baseline. A config that
cannot be read makes a "failed" row and a non-zero exit, and the other rows still print."""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

from tiny_config import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(mta, configs):
    cmd = [sys.executable, str(ROOT / "bench" / "train_gpu.py"), "--device", "cpu", "--mta", mta, "--gpus", "2",
           "--steps", "1", "--warmup", "0", "--seq", "16", "--batch", "2", "--configs", ",".join(configs)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mta", required=True)
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        paths = []
        for name, att in (("tiny-mta", {"type": "mta", "kq_pre": {"q": 2, "k": 3}}), ("tiny-transformer", {"type": "standard"}),
                          ("tiny2-transformer", {"type": "standard"})):
            p = tmp / f"{name}.json"
            p.write_text(json.dumps(tiny_config(name, att)))
            paths.append(str(p))

        r = run(args.mta, paths)
        rows = [l for l in r.stdout.splitlines() if l.startswith("| tiny")]
        names = [l.split("|")[1].strip() for l in rows]
        numeric = all(l.split("|")[4].strip().replace(",", "").isdigit() and l.split("|")[8].strip().endswith("x")
                      for l in rows)
        frac = [l for l in r.stdout.splitlines() if l.startswith("tiny-mta: MTA tokens/s as a fraction")]
        good = r.returncode == 0 and names == ["tiny-mta", "tiny-transformer", "tiny2-transformer"] and numeric and len(frac) == 1
        print(("ok   " if good else "FAIL ") + "train_gpu.py: 3 configs over 2 queues, rows in the given order, fraction line")
        if not good:
            ok = False
            print(r.stdout, r.stderr[-3000:])

        bad = tmp / "missing.json"
        r = run(args.mta, [paths[1], str(bad)])
        rows = [l for l in r.stdout.splitlines() if l.startswith("| ")]
        good = (r.returncode != 0 and any(l.startswith("| tiny-transformer |") and l.split("|")[8].strip().endswith("x")
                                          for l in rows)
                and any(l.startswith("| missing |") and "failed" in l for l in rows))
        print(("ok   " if good else "FAIL ") + "train_gpu.py: an unreadable config fails its row and the exit code, not the others")
        if not good:
            ok = False
            print(r.returncode, r.stdout, r.stderr[-3000:])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
