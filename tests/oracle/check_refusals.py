#!/usr/bin/python3
"""Refusal test of `mta attn`: input that does not fit must be refused cleanly.

    /usr/bin/python3 tests/oracle/check_refusals.py --mta build/src/mta [-v]

Every case starts from a valid all-options-on spec and input (checked first: it must run, exit 0),
breaks one thing, runs `MTA attn --spec S --in I --out OUTDIR/OUT.safetensors` and requires:
  - exit status exactly 2;
  - stderr exactly one non-empty line (after stripping the trailing newline) that names the
    problem: a case-specific set of patterns (case-insensitive regexes; every group must match,
    a group matches when any of its alternatives does), e.g. the tensor name as a token
    ('q', "dout"), the spec field path ("kq_pre.k", "head_pre.group"), "NaN", the file name;
  - no OUT file afterwards, and OUTDIR empty (no leftover temporary files).
Cases: every refusal named in shared/design/mta-semantics.md (wrong shape, even ck with "both", a
group that does not divide H, a missing tensor, NaN input) and more: q/k/v shapes against the spec
and against each other, each missing enabled parameter, each parameter with a wrong shape, NaN/Inf
in q, k, v, dout and parameters (F32 and F64), bad specs (unknown field at top level and nested,
not JSON, not an object, wrong types, out-of-range values, bad pad_key), missing spec/input files,
truncated or corrupt safetensors (cut in the header, cut in the data, garbage JSON header, header
length past the end, bad offsets, unknown dtype), integer dtypes.
Prints one line per case and `N passed, M failed`; exits 1 on failure.
"""
import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

B, H, T, D = 2, 4, 6, 8
BASE_SPEC = {"heads": H, "head_dim": D,
             "kq_pre": {"q": 3, "k": 5, "pad_key": "both"},
             "head_pre": {"group": 2},
             "kq_post": {"q": 2, "k": 3, "pad_key": "left"},
             "head_post": {"group": 4},
             "norm": True, "depth_scale_layer": 3, "gate": True}
PARAM_SHAPES = {"kq_pre": (H, 3, 5), "head_pre": (H // 2, 2, 2), "kq_post": (H, 2, 3),
                "head_post": (H // 4, 4, 4), "norm": (D,), "gate_w": (D,), "gate_b": (1,)}


def base_tensors(dtype=np.float32):
    rng = np.random.default_rng(7)
    t = {n: rng.standard_normal((B, H, T, D)).astype(dtype) for n in ("q", "k", "v", "dout")}
    for n, s in PARAM_SHAPES.items():
        t[n] = (0.5 * rng.standard_normal(s)).astype(dtype)
    t["norm"] = (1 + 0.3 * rng.standard_normal((D,))).astype(dtype)
    return t


# ----------------------------------------------------------------------------------- patterns --
def tok(*names):
    """The tensor / field name as a token: not part of a longer identifier or dotted path."""
    return [rf"(?<![\w.]){re.escape(n)}(?![\w.])" for n in names]


def field(*names):
    """A spec field as a whole dotted path, bare or under "spec." ("heads", "spec.heads")."""
    return [rf"(?<![\w.])(spec\.)?{re.escape(n)}(?![\w.])" for n in names]


MISSING = [r"missing", r"not found", r"absent", r"no tensor", r"not present", r"required", r"does not contain",
           r"lacks", r"need"]
SHAPE = [r"shape", r"dim", r"expected", r"\[[\d, ]*\]", r"rank"]


def lit(*ss):
    return [re.escape(s) for s in ss]


# ----------------------------------------------------------------------------------- the cases --
def spec_with(**kw):
    s = json.loads(json.dumps(BASE_SPEC))
    for k, v in kw.items():
        if v is DELETE:
            s.pop(k, None)
        else:
            s[k] = v
    return s


DELETE = object()


def tensors_with(drop=(), dtype=np.float32, **kw):
    t = base_tensors(dtype)
    for n in drop:
        del t[n]
    t.update(kw)
    return t


def rnd(shape, dtype=np.float32, seed=3):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def with_value(name, idx, value, dtype=np.float32):
    t = base_tensors(dtype)
    a = t[name].copy()
    a[idx] = value
    t[name] = a
    return t


def build_cases():
    """(name, spec, tensors, patterns); spec: dict, str (raw file text) or None (no file);
    tensors: dict, bytes (raw file) or None (no file); patterns: list of groups of alternatives."""
    good = serialize_base()
    (hlen,) = struct.unpack("<Q", good[:8])
    C = []
    add = lambda name, spec, tens, *groups: C.append((name, spec, tens, list(groups)))  # noqa: E731

    # --- q, k, v shapes against the spec and against each other
    add("q,k,v heads != spec.heads", BASE_SPEC, tensors_with(**{n: rnd((B, H + 1, T, D)) for n in "qkv"}),
        tok("q", "k", "v"), [r"head"] + SHAPE)
    add("q heads != spec.heads (k, v fine)", BASE_SPEC, tensors_with(q=rnd((B, 2, T, D))), tok("q"), [r"head"] + SHAPE)
    add("q,k,v head_dim != spec.head_dim", BASE_SPEC, tensors_with(**{n: rnd((B, H, T, D + 1)) for n in "qkv"}),
        tok("q", "k", "v"), [r"head_dim", r"head dim"] + SHAPE)
    add("k has another T than q", BASE_SPEC, tensors_with(k=rnd((B, H, T + 1, D))), tok("k"), SHAPE)
    add("k has another B than q", BASE_SPEC, tensors_with(k=rnd((B + 1, H, T, D))), tok("k"), SHAPE)
    add("v has another D than q", BASE_SPEC, tensors_with(v=rnd((B, H, T, D + 1))), tok("v"), SHAPE)
    add("v has another T than q,k", BASE_SPEC, tensors_with(v=rnd((B, H, T - 1, D))), tok("v"), SHAPE)
    add("q of rank 3", BASE_SPEC, tensors_with(q=rnd((H, T, D))), tok("q"), SHAPE)
    add("q of rank 5", BASE_SPEC, tensors_with(q=rnd((1, B, H, T, D))), tok("q"), SHAPE)
    add("all of q,k,v of rank 3", BASE_SPEC, tensors_with(**{n: rnd((H, T, D)) for n in "qkv"}), tok("q", "k", "v"),
        SHAPE)
    add("q with T = 0", BASE_SPEC, tensors_with(**{n: np.zeros((B, H, 0, D), np.float32) for n in ("q", "k", "v", "dout")}),
        tok("q", "k", "v", "dout"), [r"empty", r"\b0\b", r"zero"] + SHAPE)
    add("dout shape != q shape", BASE_SPEC, tensors_with(dout=rnd((B, H, T + 1, D))), tok("dout"), SHAPE)

    # --- spec inconsistencies the page names
    add("even ck with pad both (kq_pre)", spec_with(kq_pre={"q": 3, "k": 4, "pad_key": "both"}),
        tensors_with(kq_pre=rnd((H, 3, 4))), lit("kq_pre.k"), [r"odd", r"even"])
    add("even ck with pad both (kq_post)", spec_with(kq_post={"q": 2, "k": 2, "pad_key": "both"}),
        tensors_with(kq_post=rnd((H, 2, 2))), lit("kq_post.k"), [r"odd", r"even"])
    add("even ck, pad_key absent (defaults to both)", spec_with(kq_pre={"q": 3, "k": 6}),
        tensors_with(kq_pre=rnd((H, 3, 6))), lit("kq_pre.k", "kq_pre.pad_key"))
    add("head_pre group does not divide H", spec_with(head_pre={"group": 3}), tensors_with(head_pre=rnd((1, 3, 3))),
        lit("head_pre.group"), [r"divide", r"multiple"] + lit(str(H)))
    add("head_post group does not divide H", spec_with(head_post={"group": 3}), tensors_with(head_post=rnd((1, 3, 3))),
        lit("head_post.group"))
    add("head_post group > H", spec_with(head_post={"group": 8}), tensors_with(head_post=rnd((1, 8, 8))),
        lit("head_post.group"))
    add("head_pre group 0", spec_with(head_pre={"group": 0}), base_tensors(), lit("head_pre.group"))
    add("kq_pre.q = 0", spec_with(kq_pre={"q": 0, "k": 5, "pad_key": "both"}), base_tensors(), lit("kq_pre.q"))
    add("kq_post.k negative", spec_with(kq_post={"q": 2, "k": -3, "pad_key": "left"}), base_tensors(),
        lit("kq_post.k"))
    add("heads = 0", spec_with(heads=0), base_tensors(), field("heads"))
    add("head_dim missing", spec_with(head_dim=DELETE), base_tensors(), field("head_dim"))
    add("head_dim a string", spec_with(head_dim="8"), base_tensors(), field("head_dim"))
    add("heads a float", spec_with(heads=4.5), base_tensors(), field("heads"))
    add("bad pad_key", spec_with(kq_pre={"q": 3, "k": 5, "pad_key": "center"}), base_tensors(), [r"pad_key"])
    add("norm not a boolean", spec_with(norm="yes"), base_tensors(), field("norm"))
    add("depth_scale_layer negative", spec_with(depth_scale_layer=-1), base_tensors(), field("depth_scale_layer"))
    add("kq_pre not an object", spec_with(kq_pre=5), base_tensors(), field("kq_pre"))

    # --- missing tensors
    for n in ["q", "k", "v"] + list(PARAM_SHAPES):
        add(f"missing tensor {n}", BASE_SPEC, tensors_with(drop=[n]), tok(n), MISSING)

    # --- parameters with a wrong shape
    wrong = {"kq_pre": (H, 3, 4), "head_pre": (1, 4, 4), "kq_post": (H, 2), "head_post": (H, 1, 1),
             "norm": (D + 1,), "gate_w": (1,), "gate_b": (2,)}
    for n, s in wrong.items():
        add(f"{n} of shape {list(s)} (expected {list(PARAM_SHAPES[n])})", BASE_SPEC, tensors_with(**{n: rnd(s)}),
            tok(n), SHAPE)
    add("kq_pre shape of swapped (ck, cq)", BASE_SPEC, tensors_with(kq_pre=rnd((H, 5, 3))), tok("kq_pre"), SHAPE)
    add("gate_b as a scalar []", BASE_SPEC, tensors_with(gate_b=np.array(0.5, dtype=np.float32)), tok("gate_b"),
        SHAPE)

    # --- non-finite values
    nan, inf = float("nan"), float("inf")
    add("NaN in q", BASE_SPEC, with_value("q", (1, 2, 3, 4), nan), tok("q"), [r"nan"])
    add("NaN in q (first element)", BASE_SPEC, with_value("q", (0, 0, 0, 0), nan), tok("q"), [r"nan"])
    add("Inf in v", BASE_SPEC, with_value("v", (0, 3, 5, 7), inf), tok("v"), [r"inf", r"finite"])
    add("-Inf in k", BASE_SPEC, with_value("k", (1, 0, 0, 1), -inf), tok("k"), [r"inf", r"finite"])
    add("NaN in dout", BASE_SPEC, with_value("dout", (1, 1, 1, 1), nan), tok("dout"), [r"nan"])
    add("NaN in kq_pre", BASE_SPEC, with_value("kq_pre", (2, 1, 1), nan), tok("kq_pre"), [r"nan"])
    add("Inf in head_post", BASE_SPEC, with_value("head_post", (0, 1, 2), inf), tok("head_post"), [r"inf", r"finite"])
    add("NaN in gate_b", BASE_SPEC, with_value("gate_b", (0,), nan), tok("gate_b"), [r"nan"])
    add("NaN in q (F64 input)", BASE_SPEC, with_value("q", (0, 1, 2, 3), nan, np.float64), tok("q"), [r"nan"])
    add("Inf in v (F64 input)", BASE_SPEC, with_value("v", (1, 1, 1, 1), inf, np.float64), tok("v"),
        [r"inf", r"finite"])
    big = tensors_with()
    big["v"] = big["v"].astype(np.float64)
    big["v"][0, 0, 0, 0] = 1e300
    add("F64 value overflowing F32 in v (q is F32)", BASE_SPEC, big, tok("v"), [r"inf", r"finite", r"range", r"overflow", r"dtype", r"F64"])

    # --- dtypes
    add("q of dtype I32", BASE_SPEC, tensors_with(q=np.ones((B, H, T, D), np.int32)), tok("q"),
        [r"I32", r"int", r"dtype", r"type"])
    add("kq_pre of dtype I64", BASE_SPEC, tensors_with(kq_pre=np.ones(PARAM_SHAPES["kq_pre"], np.int64)),
        tok("kq_pre"), [r"I64", r"int", r"dtype", r"type"])
    add("v of dtype U8", BASE_SPEC, tensors_with(v=np.ones((B, H, T, D), np.uint8)), tok("v"),
        [r"U8", r"int", r"dtype", r"type"])

    # --- the spec file
    add("spec with an unknown field", spec_with(mystery_option=1), base_tensors(), field("mystery_option"),
        [r"unknown", r"unexpected", r"not allowed", r"unsupported", r"unrecognized"])
    add("spec with a typo'd field (heads_dim)", spec_with(heads_dim=8), base_tensors(), field("heads_dim"))
    add("spec with an unknown nested field", spec_with(kq_pre={"q": 3, "k": 5, "pad_key": "both", "dilation": 2}),
        base_tensors(), [r"dilation"], [r"kq_pre"])
    add("spec not valid JSON", '{"heads": 4, "head_dim": 8,', base_tensors(), [r"json", r"parse", r"syntax"])
    add("spec empty file", "", base_tensors(), [r"json", r"parse", r"empty", r"syntax"])
    add("spec a JSON array", "[4, 8]", base_tensors(), [r"spec"], [r"object"])
    add("spec file missing", None, base_tensors(), lit("NOSPEC.json"))

    # --- the input file
    add("input file missing", BASE_SPEC, None, lit("NOIN.safetensors"))
    add("input file empty", BASE_SPEC, b"", lit("IN.safetensors"))
    add("input shorter than 8 bytes", BASE_SPEC, good[:5], lit("IN.safetensors"))
    add("input cut in the header", BASE_SPEC, good[:8 + hlen // 2], lit("IN.safetensors"))
    add("input cut in the data", BASE_SPEC, good[:len(good) - 13], lit("IN.safetensors"))
    add("input cut right after the header", BASE_SPEC, good[:8 + hlen], lit("IN.safetensors"))
    garbage = b"{this is not json" + b" " * (hlen - len(b"{this is not json"))
    add("corrupt header: garbage JSON", BASE_SPEC, good[:8] + garbage + good[8 + hlen:], lit("IN.safetensors"))
    add("corrupt header: length past the end of the file", BASE_SPEC,
        struct.pack("<Q", len(good) + 100) + good[8:], lit("IN.safetensors"))
    add("corrupt header: length 2^63", BASE_SPEC, struct.pack("<Q", 1 << 63) + good[8:], lit("IN.safetensors"))
    add("corrupt header: a JSON array", BASE_SPEC, patch_header(good, lambda h: [h]), lit("IN.safetensors"))
    add("corrupt header: offsets past the data", BASE_SPEC,
        patch_header(good, lambda h: set_off(h, "v", [h["v"]["data_offsets"][0], 10 ** 9])), lit("IN.safetensors"))
    add("corrupt header: offsets not matching shape x dtype", BASE_SPEC,
        patch_header(good, lambda h: set_off(h, "q", [h["q"]["data_offsets"][0], h["q"]["data_offsets"][1] - 4])),
        lit("IN.safetensors"))
    add("corrupt header: overlapping tensors", BASE_SPEC,
        patch_header(good, lambda h: set_off(h, "k", list(h["q"]["data_offsets"]))), lit("IN.safetensors"))
    add("corrupt header: unknown dtype", BASE_SPEC, patch_header(good, lambda h: set_field(h, "q", "dtype", "F8_X")),
        lit("IN.safetensors"))
    add("corrupt header: negative shape", BASE_SPEC,
        patch_header(good, lambda h: set_field(h, "gate_b", "shape", [-1])), lit("IN.safetensors"))
    add("corrupt header: shape not a list", BASE_SPEC,
        patch_header(good, lambda h: set_field(h, "norm", "shape", "8")), lit("IN.safetensors"))
    add("corrupt header: data_offsets missing", BASE_SPEC,
        patch_header(good, lambda h: del_field(h, "dout", "data_offsets")), lit("IN.safetensors"))
    return C


def serialize_base():
    return st.serialize(base_tensors())


def patch_header(buf, fn):
    (n,) = struct.unpack("<Q", buf[:8])
    h = json.loads(buf[8:8 + n])
    h = fn(h)
    hj = json.dumps(h).encode()
    return struct.pack("<Q", len(hj)) + hj + buf[8 + n:]


def set_off(h, name, off):
    h[name]["data_offsets"] = off
    return h


def set_field(h, name, field, value):
    h[name][field] = value
    return h


def del_field(h, name, field):
    del h[name][field]
    return h


# ---------------------------------------------------------------------------------------- runner --
def run_one(mta, spec, tens, work, extra=()):
    """Writes the files into a fresh folder under `work`; returns (rc, stderr, outdir, out_path)."""
    d = tempfile.mkdtemp(dir=work)
    outdir = os.path.join(d, "outdir")
    os.makedirs(outdir)
    out_path = os.path.join(outdir, "OUT.safetensors")
    if spec is None:
        spec_path = os.path.join(d, "NOSPEC.json")
    else:
        spec_path = os.path.join(d, "SPEC.json")
        with open(spec_path, "w") as f:
            f.write(spec if isinstance(spec, str) else json.dumps(spec))
    if tens is None:
        in_path = os.path.join(d, "NOIN.safetensors")
    else:
        in_path = os.path.join(d, "IN.safetensors")
        with open(in_path, "wb") as f:
            f.write(tens if isinstance(tens, (bytes, bytearray)) else st.serialize(tens))
    try:
        p = subprocess.run([mta, "attn", "--spec", spec_path, "--in", in_path, "--out", out_path, *extra],
                           capture_output=True, text=True, timeout=120, errors="replace")
    except subprocess.TimeoutExpired:
        return None, "(timed out)", outdir, out_path
    except OSError as e:
        return None, f"(cannot run {mta}: {e})", outdir, out_path
    return p.returncode, p.stderr, outdir, out_path


def judge(rc, err, outdir, out_path, groups):
    problems = []
    if rc != 2:
        problems.append(f"exit status {rc}, expected 2")
    line = err[:-1] if err.endswith("\n") else err
    if not line.strip():
        problems.append("stderr is empty")
    elif "\n" in line or "\r" in line:
        problems.append(f"stderr has {line.count(chr(10)) + 1} lines, expected 1")
    for g in groups:
        if not any(re.search(p, line, re.IGNORECASE) for p in g):
            problems.append(f"stderr matches none of {g}")
    if os.path.exists(out_path):
        problems.append("the output file exists")
    left = sorted(os.listdir(outdir)) if os.path.isdir(outdir) else []
    left = [x for x in left if x != "OUT.safetensors"]
    if left:
        problems.append(f"leftover files in the output folder: {left}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mta", required=True, help="path of the mta binary")
    ap.add_argument("-v", "--verbose", action="store_true", help="print stderr of passing cases too")
    args = ap.parse_args()
    mta = os.path.abspath(args.mta)
    if not os.access(mta, os.X_OK):
        print(f"mta binary not found or not executable: {mta}")
        print("0 passed, 1 failed")
        return 1

    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="mta_refusals_") as work:
        # the baseline must be accepted, otherwise every refusal below proves nothing
        rc, err, outdir, out_path = run_one(mta, BASE_SPEC, base_tensors(), work)
        ok = rc == 0 and os.path.exists(out_path)
        if ok:
            names = set(st.read(out_path))
            want = {"out", "grad_q", "grad_k", "grad_v"} | {"grad_" + n for n in PARAM_SHAPES}
            ok = names == want
            why = "" if ok else f"output tensors {sorted(names)}, expected {sorted(want)}"
        else:
            why = f"exit {rc}, stderr: {err.strip()[:300]}"
        print(f"{'ok  ' if ok else 'FAIL'} baseline (valid all-on spec and input) is accepted{': ' + why if why else ''}")
        passed += ok
        failed += not ok
        # bad option values: valid files, one bad flag
        flag_cases = [("--impl bogus", BASE_SPEC, base_tensors(), [[r"--impl"]], ["--impl", "bogus"]),
                      ("--device tpu", BASE_SPEC, base_tensors(), [[r"--device"]], ["--device", "tpu"])]
        for name, spec, tens, groups, extra in [(n, s, t, g, ()) for n, s, t, g in build_cases()] + flag_cases:
            rc, err, outdir, out_path = run_one(mta, spec, tens, work, extra)
            problems = judge(rc, err, outdir, out_path, groups)
            line = err.rstrip("\n")
            if problems:
                failed += 1
                print(f"FAIL {name}: {'; '.join(problems)}")
                print(f"       stderr: {line[:400]!r}")
            else:
                passed += 1
                print(f"ok   {name}" + (f"  | {line}" if args.verbose else ""))
            sys.stdout.flush()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
