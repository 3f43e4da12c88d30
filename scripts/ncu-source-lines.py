#!/usr/bin/env python3
"""The hottest source lines of one kernel from ncu's source view (gpu-ncu.sh source): reads the CSV of
`ncu --import REP --page source --print-source cuda,sass --csv`, keeps the CUDA source rows (their
address column is "-"; the SASS rows under them carry hex addresses) and prints the top N by
instructions executed and by warp-stall samples, each as a share of the kernel's total, then by each
per-line "Excessive" column ncu reports (shared-memory bank conflicts, uncoalesced global sectors).
Usage: ncu-source-lines.py SOURCE.csv [N]  (default 40)."""
import csv
import sys


def number(s):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: ncu-source-lines.py SOURCE.csv [N]")
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.reader(f))
    head_at = next((i for i, r in enumerate(rows) if any("Instructions Executed" in c for c in r)), None)
    if head_at is None:
        sys.exit("ncu-source-lines: no 'Instructions Executed' column in " + sys.argv[1])
    header = rows[head_at]
    col = {name: i for i, name in enumerate(header)}
    addr = next(i for i, n in enumerate(header) if "Address" in n or n.strip() == "#")
    src = next((i for i, n in enumerate(header) if n.strip() == "Source"), addr + 1)
    inst = next(i for i, n in enumerate(header) if n.strip() == "Instructions Executed")
    stall = next((i for i, n in enumerate(header) if n.startswith("Warp Stall Sampling (All")), None)
    # Per-line counts ncu attributes to wasted memory traffic (bank conflicts, uncoalesced sectors).
    excess = [(i, n.strip()) for i, n in enumerate(header) if "Excessive" in n]
    lines = []
    cur_file = next((r[1] for r in rows[:head_at] if r and r[0] == "File Path" and len(r) > 1), "")
    for r in rows[head_at + 1:]:
        if r and r[0] == "File Path" and len(r) > 1:  # one section per source file
            cur_file = r[1]
            continue
        if len(r) <= inst or r[addr].strip() not in ("-", ""):
            continue
        extra = [number(r[i]) if i < len(r) else 0.0 for i, _ in excess]
        where = f"{cur_file.rsplit('/', 1)[-1]}:{r[0].strip()}"
        lines.append((r[src].strip(), number(r[inst]), number(r[stall]) if stall is not None else 0.0, where, extra))
    total_i = sum(x[1] for x in lines) or 1.0
    total_s = sum(x[2] for x in lines) or 1.0
    print(f"columns: {', '.join(h for h in header if h)}"[:400])
    print(f"source rows: {len(lines)}; instructions executed {total_i:.4g}; stall samples {total_s:.4g}")
    for key, label, total in ((1, "instructions", total_i), (2, "stall samples", total_s)):
        print(f"\n-- top {top} source lines by {label} --")
        for text, i, s, _, _ in sorted(lines, key=lambda x: -x[key])[:top]:
            print(f"{100 * i / total_i:5.1f}% inst {100 * s / total_s:5.1f}% stall | {text[:110]}")
    for k, (_, name) in enumerate(excess):
        total_x = sum(x[4][k] for x in lines)
        if total_x <= 0:
            continue
        print(f"\n-- top {min(top, 15)} source lines by {name} (total {total_x:.4g}) --")
        for text, i, s, line, extra in sorted(lines, key=lambda x: -x[4][k])[:min(top, 15)]:
            if extra[k] > 0:
                print(f"{100 * extra[k] / total_x:5.1f}% excess {100 * s / total_s:5.1f}% stall | "
                      f"{line}: {text[:100]}")


if __name__ == "__main__":
    main()
