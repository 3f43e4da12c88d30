#!/usr/bin/env python3
"""Markdown table of the final evaluations of runs made by scripts/multi-run.sh.

    python3 scripts/results_table.py OUT_DIR CONFIG...

One row per config (runs OUT_DIR/<config name>-seed<s>/metrics.jsonl, the last line of kind "eval"):
mean +- std over seeds and the per-seed values of the error rate (toy task) or of the perplexity,
overall and per validation group (language modelling), and the steps each run reached.
"""
import json
import pathlib
import statistics
import sys


def last_eval(metrics):
    evals = [d for d in map(json.loads, metrics.read_text().splitlines()) if d.get("kind") == "eval"]
    if not evals:
        raise SystemExit(f"{metrics}: no evaluation yet")
    return evals[-1]


def mean_sd(xs):
    return f"{statistics.mean(xs):.2f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def main():
    out, configs = pathlib.Path(sys.argv[1]), sys.argv[2:]
    rows = []
    for config in configs:
        name = pathlib.Path(config).stem
        runs = sorted(out.glob(f"{name}-seed*/metrics.jsonl"), key=lambda p: p.parent.name)
        if not runs:
            raise SystemExit(f"no runs of {name} under {out}")
        rows.append((name, [(r.parent.name.rsplit("-seed", 1)[1], last_eval(r)) for r in runs]))
    if "error_rate" in rows[0][1][0][1]:
        print("| config | error % (mean +- std) | per seed | steps |")
        print("|---|---|---|---|")
        for name, evs in rows:
            errs = [100 * e["error_rate"] for _, e in evs]
            print(f"| {name} | {mean_sd(errs)} | {' / '.join(f'{x:.1f}' for x in errs)} | "
                  f"{' / '.join(str(e['step']) for _, e in evs)} |")
        return
    groups = sorted(rows[0][1][0][1].get("groups", {}))
    print("| config | ppl (mean +- std) | per seed | " + " | ".join(groups) + " | mean of groups | steps |")
    print("|---|---|---|" + "---|" * len(groups) + "---|---|")
    for name, evs in rows:
        ppl = [e["ppl"] for _, e in evs]
        per_group = [mean_sd([e["groups"][g]["ppl"] for _, e in evs]) for g in groups]
        mog = mean_sd([e.get("ppl_mean_of_groups", float("nan")) for _, e in evs])
        print(f"| {name} | {mean_sd(ppl)} | {' / '.join(f'{x:.2f}' for x in ppl)} | " + " | ".join(per_group) +
              f" | {mog} | {' / '.join(str(e['step']) for _, e in evs)} |")


if __name__ == "__main__":
    main()
