#!/usr/bin/env python3
"""scripts/multi-run.sh end to end on the CPU: two tiny toy-task configs x two seeds, then the table
of scripts/results_table.py (one row per config, one value per seed, the steps each run reached), and
its refusal of a folder without runs."""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from tiny_config import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mta", required=True)
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        configs = []
        for name, att in (("tiny-std", {"type": "standard"}), ("tiny-mta", {"type": "mta", "kq_pre": {"q": 2, "k": 3}})):
            cfg = tiny_config(name, att)
            path = tmp / f"{name}.json"
            path.write_text(json.dumps(cfg))
            configs.append(str(path))
        env = dict(os.environ, MTA=os.path.abspath(args.mta), DEVICE="cpu", SEEDS="1 2", STEPS="3",
                   OUT_DIR=str(tmp / "runs"))
        r = subprocess.run(["bash", str(ROOT / "scripts" / "multi-run.sh")] + configs, env=env, capture_output=True,
                           text=True)
        rows = [l for l in r.stdout.splitlines() if l.startswith("| tiny-")]
        good = r.returncode == 0 and len(rows) == 2 and all(l.count("/") >= 2 and "3 / 3" in l for l in rows)
        print(("ok   " if good else "FAIL ") + "multi-run: table of 2 configs x 2 seeds, 3 steps each")
        if not good:
            print(r.stdout, r.stderr)
        ok &= good
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), str(tmp / "empty")] + configs,
                           capture_output=True, text=True)
        good = r.returncode != 0 and "no runs of tiny-std" in (r.stdout + r.stderr)
        print(("ok   " if good else "FAIL ") + "results_table: refuses a folder without runs")
        ok &= good
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
