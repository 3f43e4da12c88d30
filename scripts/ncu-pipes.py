#!/usr/bin/env python3
"""One kernel's pipe utilizations and stall reasons from `ncu --set full` (gpu-ncu.sh pipes): reads the
CSV of `ncu --import REP --page raw --csv` (a header row, a units row, one row per profiled launch) and
prints the first launch's duration, issue-slot and L1 / L2 utilizations, each pipe's share of its peak,
shared-memory bank conflicts, and the cycles per issued instruction a warp spends in each stall reason.
Session 15 read FlashMix's output pass and kq-layer kernel Q this way (docs/flash-mta.md).
Usage: ncu-pipes.py RAW.csv"""
import csv
import sys

KEYS = ("gpu__time_duration.sum", "smsp__issue_active.avg.pct", "l1tex__throughput.avg.pct_of_peak_sustained_active",
        "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
        "lts__throughput.avg.pct_of_peak_sustained_elapsed", "smsp__average_warp_latency_per_inst_issued",
        "smsp__average_warps_issue_stalled_")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: ncu-pipes.py RAW.csv")
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        sys.exit(f"ncu-pipes: no profiled launch in {sys.argv[1]}")
    names, units, values = rows[0], rows[1], rows[2]
    for name, unit, value in zip(names, units, values):
        if "." in name.split("__")[0]:
            continue  # ncu's section-prefixed duplicates (e.g. "LTS.TriageCompute.lts__...")
        pipe = name.startswith("sm__") and "pipe" in name and ".avg.pct_of_peak_sustained_active" in name
        if not (pipe or name.startswith(KEYS)):
            continue
        try:
            if float(value.replace(",", "")) == 0:
                continue
        except ValueError:
            continue
        print(f"  {name[:95]:95s} {value} {unit}")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # piped into head
        pass
