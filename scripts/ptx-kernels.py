#!/usr/bin/env python3
"""Compares the kernels of two sets of PTX files by name, without a GPU: for a refactor that moves
kernels between files (ptx-same.sh compares whole files). Each `.entry` is keyed by its kernel name and
template arguments (the anonymous namespace's file-specific mangling dropped) and its body normalized
(its own name, shared-variable manglings, labels and comments); kernels whose bodies still differ are
compared again with the operands of commutative integer instructions sorted, and else reported with the
number of lines that differ (as a multiset: a renumbering of virtual registers shows as a few lines).

    python3 scripts/ptx-kernels.py OLD.ptx[,OLD2.ptx] NEW.ptx[,NEW2.ptx]

PTX as ptx-same.sh makes it: nvcc -DMTA_HAVE_CUDA=1 -Isrc -O3 -DNDEBUG -arch=sm_90 --expt-relaxed-constexpr
-std=c++20 -ptx -x cu FILE.cu -o FILE.ptx (session 17: flash_kq_layer.cu's split). Exit status 0 when
every kernel is present on both sides and identical (up to commutative order), 1 otherwise."""
import collections
import re
import sys


def entries(paths):
    out = {}
    for path in paths.split(","):
        for part in re.split(r"\n(?=\.(?:visible )?\.?entry )", open(path).read()):
            m = re.match(r"\.(?:visible \.)?entry (\S+)\(", part)
            if not m:
                continue
            name = m.group(1)
            k = re.search(r"_cu_[0-9a-f]{8}\d+([A-Za-z_]\w*?kernel)(I\w*?EE)?", name)
            key = (k.group(1) + (k.group(2) or "")) if k else name
            body = part.replace(name, "K")
            body = re.sub(r"_Z\w*?(smem_raw|bars)\w*", r"\1", body)
            body = re.sub(r"\$L__\w+", "L", body)
            body = "\n".join(line.strip() for line in re.sub(r"//[^\n]*", "", body).split("\n") if line.strip())
            if key in out and out[key] != body:
                sys.exit(f"ptx-kernels: {key} twice with different bodies in {paths}")
            out[key] = body
    return out


def commutative(body):
    lines = []
    for line in body.split("\n"):
        m = re.match(r"(add\.[su]\d+|mul\.lo\.[su]\d+|and\.b\d+|or\.b\d+)\s+(%\w+),\s*(\S+),\s*(\S+);", line)
        if m:
            line = f"{m.group(1)} {m.group(2)}, " + ", ".join(sorted([m.group(3), m.group(4)])) + ";"
        lines.append(line)
    return lines


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    old, new = entries(sys.argv[1]), entries(sys.argv[2])
    ok = True
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            print(f"only in {'new' if key in new else 'old'}: {key}")
            ok = False
        elif old[key] == new[key]:
            print(f"same: {key}")
        elif commutative(old[key]) == commutative(new[key]):
            print(f"same up to commutative operand order: {key}")
        else:
            a, b = collections.Counter(commutative(old[key])), collections.Counter(commutative(new[key]))
            print(f"differs: {key} ({sum((a - b).values())} of {len(old[key].splitlines())} lines)")
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
