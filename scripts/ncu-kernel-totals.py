#!/usr/bin/env python3
"""Per-kernel totals of an `ncu --print-summary per-kernel` report (gpu-ncu.sh step): each kernel's
time summed over its launches (ncu groups launches by grid; those groups are merged by name here),
largest first. Usage: ncu-kernel-totals.py REPORT.txt [N]  (N rows, default 30)."""
import collections
import re
import sys


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: ncu-kernel-totals.py REPORT.txt [N]")
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    header = re.compile(r"\s+(?:void )?(?:mta::<unnamed>::)?([A-Za-z_0-9:]+)(<[^(]*>)?\s*\(.*Invocations (\d+)")
    total = collections.defaultdict(lambda: [0, 0.0])  # name -> [launches, ms]
    name = None
    with open(sys.argv[1]) as f:
        for line in f:
            m = header.match(line)
            if m:
                name, launches = m.group(1) + (m.group(2) or "")[:40], int(m.group(3))
                continue
            if name and "gpu__time_duration.sum" in line:
                parts = line.split()  # name, unit, min, max, average
                avg_us = float(parts[-1]) * (1000.0 if parts[1] == "ms" else 1.0)
                total[name][0] += launches
                total[name][1] += launches * avg_us / 1000.0
                name = None
    print(f"all kernels: {sum(v[1] for v in total.values()):.1f} ms")
    for k, (n, ms) in sorted(total.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"{ms:9.2f} ms {n:5d}  {k}")


if __name__ == "__main__":
    main()
