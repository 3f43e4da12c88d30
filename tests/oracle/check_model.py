#!/usr/bin/python3
"""Oracle test of the whole C++ model against the independent PyTorch model (model_torch.py).

    /usr/bin/python3 tests/oracle/check_model.py --tool build/tests/mta_model_grads [--keep DIR] [-v]

For each attention kind (standard; MTA with kq_pre 2x5, head_pre g=2, kq_post 3x3 left, head_post
g=2, norm, gate, depth scaling and kq_layers [1]; DIFF) a tiny model (vocab 13, dim 16, 2 layers,
2 heads (4 for DIFF), ffn_multiple_of 8, rope_theta 1e4) gets random weights (MTA kernels away from
identity, norm weights away from 1) and a random batch B=3, T=11 with some zero loss weights. The tool
(`mta_model_grads CONFIG WEIGHTS BATCH OUT [--double]`) writes the mean loss and the gradient of every
parameter; these are compared with float64 torch autograd on the same weights:
  - float64 run (F64 weights, --double): relative error <= 1e-9;
  - float32 run (weights rounded to F32; the reference uses the same rounded values in float64):
    relative error <= 1e-4.
Relative error of a tensor: ||a - b|| / max(||b||, 1e-30). One line per check, `N passed, M failed`,
exit status 1 on any failure.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_torch as mtm  # noqa: E402
import st  # noqa: E402

TOL_F64 = 1e-9
TOL_F32 = 1e-4
TINY = 1e-30
B, T = 3, 11


def base_config(attention, n_heads=2):
    return {"vocab_size": 13, "dim": 16, "n_layers": 2, "n_heads": n_heads, "max_seq_len": 12,
            "ffn_multiple_of": 8, "rope_theta": 1e4, "norm_eps": 1e-5, "dropout": 0.0, "attention": attention}


CASES = [
    ("standard", base_config({"type": "standard"})),
    ("mta", base_config({"type": "mta",
                         "kq_pre": {"q": 2, "k": 5, "pad_key": "both"},
                         "head_pre": {"group": 2},
                         "kq_post": {"q": 3, "k": 3, "pad_key": "left"},
                         "head_post": {"group": 2},
                         "norm": True, "gate": True, "depth_scale": True, "kq_layers": [1]})),
    ("diff", base_config({"type": "diff"}, n_heads=4)),
]


def random_weights(cfg, gen):
    """float64 weights: matrices N(0, 0.3) (embedding) / N(0, 0.25) (linears), RMSNorm weights
    1 + N(0, 0.1), MTA kernels identity + N(0, 0.3), group norm 1 + N(0, 0.2), gate N(0, 0.3),
    DIFF lambdas N(0, 0.2), subln 1 + N(0, 0.1)."""
    ident = mtm.init_params(cfg, gen, torch.float64)
    out = {}
    for name, (shape, decay) in mtm.param_shapes(cfg).items():
        r = torch.randn(shape, generator=gen, dtype=torch.float64)
        base = name.rsplit(".", 1)[-1] if ".attention." in name else ""
        if name == "tok_embeddings.weight":
            w = 0.3 * r
        elif decay:
            w = 0.25 * r
        elif name.endswith("norm.weight") or name.endswith("subln.weight"):
            w = 1.0 + 0.1 * r
        elif base in ("kq_pre", "kq_post", "head_pre", "head_post"):
            w = ident[name] + 0.3 * r
        elif base == "norm":
            w = 1.0 + 0.2 * r
        elif base in ("gate_w", "gate_b"):
            w = 0.3 * r
        elif base.startswith("lambda_"):
            w = 0.2 * r
        else:
            raise AssertionError(f"no rule for {name}")
        out[name] = w
    return out


def random_batch(cfg, gen):
    V = cfg["vocab_size"]
    inputs = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    weights = (torch.rand((B, T), generator=gen) > 0.3).to(torch.float32)
    weights[0, 0] = 0.0
    weights[1, -1] = 0.0
    weights[2, 5] = 1.0
    return inputs, targets, weights


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), TINY))


def run_tool(tool, folder, cfg, weights, batch, double):
    tag = "f64" if double else "f32"
    cpath = os.path.join(folder, f"config_{tag}.json")
    wpath = os.path.join(folder, f"weights_{tag}.safetensors")
    bpath = os.path.join(folder, "batch.safetensors")
    opath = os.path.join(folder, f"out_{tag}.safetensors")
    with open(cpath, "w") as f:
        json.dump(cfg, f)
    np_dtype = np.float64 if double else np.float32
    st.write(wpath, {n: w.numpy().astype(np_dtype) for n, w in weights.items()})
    inputs, targets, bw = batch
    st.write(bpath, {"inputs": inputs.numpy(), "targets": targets.numpy(), "weights": bw.numpy()})
    cmd = [tool, cpath, wpath, bpath, opath] + (["--double"] if double else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return st.read(opath)


def check_case(tool, name, cfg, seed, folder, verbose):
    """Returns a list of (label, ok, message)."""
    gen = torch.Generator().manual_seed(seed)
    w64 = random_weights(cfg, gen)
    batch = random_batch(cfg, gen)
    inputs, targets, bw = batch
    results = []
    for double in (True, False):
        tag = "f64" if double else "f32"
        tol = TOL_F64 if double else TOL_F32
        weights = w64 if double else {n: w.to(torch.float32).to(torch.float64) for n, w in w64.items()}
        try:
            out = run_tool(tool, folder, cfg, weights, batch, double)
        except RuntimeError as e:
            results.append((f"{name} {tag} tool", False, str(e)))
            continue
        ref_loss, ref_grads = mtm.loss_and_grads(cfg, weights, inputs, targets, bw)
        want_dtype = np.float64 if double else np.float32
        expected = {"loss"} | {"grad." + n for n in ref_grads}
        extra, missing = set(out) - expected, expected - set(out)
        if extra or missing:
            results.append((f"{name} {tag} names", False, f"missing {sorted(missing)}, extra {sorted(extra)}"))
            continue
        worst = (0.0, "")
        bad = []
        for key in ["loss"] + ["grad." + n for n in ref_grads]:
            got = out[key]
            ref = ref_loss.reshape(1) if key == "loss" else ref_grads[key[5:]]
            if got.dtype != want_dtype or tuple(got.shape) != tuple(ref.shape):
                bad.append(f"{key}: {got.dtype}{list(got.shape)} expected {np.dtype(want_dtype)}{list(ref.shape)}")
                continue
            e = rel_err(got, ref.numpy())
            if verbose:
                print(f"    {name} {tag} {key}: rel err {e:.2e}")
            if not e <= tol:
                bad.append(f"{key}: rel err {e:.3e} > {tol:g}")
            if e > worst[0] or not worst[1]:
                worst = (e, key)
        n = 1 + len(ref_grads)
        msg = (f"loss {float(out['loss'][0]):.10f} (torch {float(ref_loss):.10f}), {n} tensors, "
               f"worst rel err {worst[0]:.2e} ({worst[1]}), tol {tol:g}")
        if bad:
            msg += "; " + "; ".join(bad)
        results.append((f"{name} {tag}", not bad, msg))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", required=True, help="path to the mta_model_grads binary")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--keep", help="write the case files into this folder (kept) instead of a temporary one")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for idx, (name, cfg) in enumerate(CASES):
            folder = os.path.join(args.keep, name) if args.keep else os.path.join(tmp, name)
            os.makedirs(folder, exist_ok=True)
            for label, ok, msg in check_case(args.tool, name, cfg, args.seed + 17 * idx, folder, args.verbose):
                print(f"{'PASS' if ok else 'FAIL'} {label}: {msg}", flush=True)
                passed += ok
                failed += not ok
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
