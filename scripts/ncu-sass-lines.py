#!/usr/bin/env python3
"""The SASS instructions under chosen source lines of one kernel, with their memory counters, from the
CSV of `ncu --import REP --page source --print-source cuda,sass --csv` (gpu-ncu.sh source): per
instruction, executions, L2 sectors against ideal (global) and shared wavefronts against ideal, to tell
which load or store of a line wastes the pipe (session 15 found cp.async rows writing 2.5x their ideal
wavefronts this way). Usage: ncu-sass-lines.py SOURCE.csv FILE_SUFFIX LINE[,LINE...]
(FILE_SUFFIX: the source file, e.g. flash_kq_layer_bwd.cu; LINE: its line numbers)."""
import csv
import sys


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: ncu-sass-lines.py SOURCE.csv FILE_SUFFIX LINE[,LINE...]")
    path, suffix, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    cur_file, col, addr, on = "", None, None, False
    for r in rows:
        if r and r[0] == "File Path":  # the CSV has one section per source file
            cur_file, on = r[1], False
            continue
        if r and r[0] == "Line No":
            col = {n: i for i, n in enumerate(r)}
            addr = col["Address"]
            continue
        if col is None or len(r) <= addr:
            continue
        if r[addr].strip() in ("-", ""):  # a source row; the SASS rows under it follow
            on = cur_file.endswith(suffix) and r[0].strip() in wanted
            if on:
                print(f"== {suffix}:{r[0]}: {r[1].strip()[:100]}")
            continue
        if not on:
            continue

        def get(name):
            i = col.get(name)
            return r[i] if i is not None and i < len(r) else ""

        if get("Address Space") in ("", "-"):
            continue  # arithmetic: no memory counters
        print(f"  {r[3].strip()[:58]:58s} x{get('Instructions Executed'):>10} "
              f"sectors {get('L2 Theoretical Sectors Global'):>10} / ideal {get('L2 Theoretical Sectors Global Ideal'):>10} "
              f"wavefronts {get('L1 Wavefronts Shared'):>10} / ideal {get('L1 Wavefronts Shared Ideal'):>10}")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # piped into head
        pass
