#!/usr/bin/env python3
"""scripts/gpu-bitwise.py on the CPU: the same binary on both sides passes (every tensor identical on
generated kq_pre cases), a base whose `out` is one ulp off in a single element is caught (exit 1,
DIFFERS), so the check can fail, and a missing folder or binary is one clear line."""
import argparse
import os
import pathlib
import stat
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-bitwise.py"

# A stand-in `mta` that runs the real one, then moves one element of `out` by one ulp.
PERTURB = """#!{python}
import subprocess, sys
import numpy as np
sys.path.insert(0, {oracle!r})
import st
args = sys.argv[1:]
rc = subprocess.call([{mta!r}] + args)
if rc == 0:
    out = args[args.index("--out") + 1]
    t = {{k: np.array(v) for k, v in st.read(out).items()}}
    flat = t["out"].reshape(-1)
    flat[0] = np.nextafter(flat[0], np.float32(np.inf))
    st.write(out, t)
sys.exit(rc)
"""


def run(args):
    return subprocess.run([sys.executable, str(SCRIPT)] + args, capture_output=True, text=True, timeout=600)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mta", required=True)
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as d:
        cases = os.path.join(d, "cases")
        common = ["--cases", cases, "--device", "cpu", "--exact", "out,grad_v"]
        p = run(["--new", args.mta, "--base", args.mta, "--make-kq-pre", "3"] + common)
        if p.returncode != 0 or "3 cases, 0 failures" not in p.stdout or "out ==" not in p.stdout:
            print(f"FAIL same binary: rc {p.returncode}\n{p.stdout}{p.stderr}")
            ok = False
        fake = pathlib.Path(d) / "mta_perturbed"
        fake.write_text(PERTURB.format(python=sys.executable, oracle=str(ROOT / "tests" / "oracle"), mta=args.mta))
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        p = run(["--new", args.mta, "--base", str(fake)] + common)
        if p.returncode != 1 or "out DIFFERS" not in p.stdout or "3 cases, 3 failures" not in p.stdout:
            print(f"FAIL perturbed base not caught: rc {p.returncode}\n{p.stdout}{p.stderr}")
            ok = False
        # Bad input: a missing folder or binary is one line naming it and a non-zero exit.
        for extra, want in ((["--cases", os.path.join(d, "none")], "no folder"),
                            (["--cases", cases, "--base", os.path.join(d, "no-mta")], "no executable mta")):
            p = subprocess.run([sys.executable, str(SCRIPT), "--new", args.mta, "--base", args.mta, "--device", "cpu"]
                               + extra, capture_output=True, text=True, timeout=60)
            err = p.stderr.strip()
            if p.returncode == 0 or want not in err or "\n" in err:
                print(f"FAIL {extra}: rc {p.returncode}, stderr {err!r}")
                ok = False
    print("gpu-bitwise checks: " + ("ok" if ok else "FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
