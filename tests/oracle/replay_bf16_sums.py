#!/usr/bin/python3
"""Float64 replays behind the bf16 baseline of `check_attn.py --device cuda` (session 19): how far the
cancelling parameter-gradient sums move under only the roundings that bf16 kernels make.

    /usr/bin/python3 tests/oracle/replay_bf16_sums.py [--case SEED:IDX ...]

For each case of check_attn's --device cuda generator (default: the three that missed the first
tolerance, 20250401:58, 20250401:115 and 77:133), on check_attn's inputs of that case:
  - with a gate: grad_gate_b exact, then with the core's output (step 7) rounded to bf16 before the
    epilogue, with dout rounded to bf16, and with both;
  - with head_post: dMpost = sum over positions of dA3_x A_y per group, exact, then with FlashMix's
    roundings before its tensor-core product: dO (the epilogue's gradient into the core) and V to
    bf16, then A, then dA3.
Prints each relative error against the exact float64 value. A diagnostic, not a test.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_attn as ca  # noqa: E402
import mta_torch as mt  # noqa: E402


def bf(x):
    return x.to(torch.bfloat16).to(torch.float64)


def case_inputs(seed, idx):
    """check_attn's spec and inputs of case idx (F32-rounded, as float64, as run_case builds them)."""
    case = ca.make_cuda_cases(idx + 1, seed)[idx]
    spec, B, T = case["spec"], case["B"], case["T"]
    H, D = spec["heads"], spec["head_dim"]
    gen = torch.Generator().manual_seed(seed * 100003 + idx)
    tens = {n: torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for n in ("q", "k", "v")}
    tens.update(mt.random_params(spec, gen, torch.float64))
    tens["dout"] = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    return spec, {n: x.float().double() for n, x in tens.items()}


def rel(a, ref):
    return float((a - ref).norm() / ref.norm())


def gate_b(spec, t, round_core, round_dout):
    """grad_gate_b with the core's output rounded to bf16 on the way forward (gradient straight
    through) and / or dout rounded."""
    ins = dict(t, dout=bf(t["dout"]) if round_dout else t["dout"])
    core_round = (lambda o: o + (bf(o) - o).detach()) if round_core else None
    _, g = mt.forward_backward(spec, ins, dtype=torch.float64, core_round=core_round)
    return g["grad_gate_b"]


def core_gradient(spec, t):
    """The epilogue's gradient into the core (dO of step 7), exact."""
    seen = {}

    def keep(o):
        o.register_hook(lambda g: seen.__setitem__("dO", g))
        return o
    mt.forward_backward(spec, t, dtype=torch.float64, core_round=keep)
    return seen["dO"] if "dO" in seen else t["dout"]


def head_post_input(spec, t):
    """A after softmax and kq_post (the head_post mix's input), steps 1-5 of mta_torch."""
    return mt.weights_before_head_post(spec, t["q"], t["k"], t)


def dmpost(A, dA3, g):
    """sum over positions of dA3_x A_y, per group of g heads."""
    B, H, T, _ = A.shape
    return torch.einsum("bgxij,bgyij->gxy", dA3.reshape(B, H // g, g, T, T), A.reshape(B, H // g, g, T, T))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="*", default=["20250401:58", "20250401:115", "77:133"])
    args = ap.parse_args()
    for c in args.case:
        seed, idx = (int(x) for x in c.split(":"))
        spec, t = case_inputs(seed, idx)
        print(f"case {seed}:{idx} [{mt.spec_summary(spec)}]")
        if mt._on(spec, "gate"):
            ref = gate_b(spec, t, False, False)
            for name, rc, rd in (("core bf16", True, False), ("dout bf16", False, True), ("both", True, True)):
                print(f"  grad_gate_b, {name:10s}: rel err {rel(gate_b(spec, t, rc, rd), ref):.2e}")
        if mt._on(spec, "head_post"):
            A, fut = head_post_input(spec, t)
            dO, v, g = core_gradient(spec, t), t["v"], spec["head_post"]["group"]
            da3 = lambda o, w: (o @ w.transpose(-1, -2)).masked_fill(fut, 0.0)  # noqa: E731
            ref = dmpost(A, da3(dO, v), g)
            for name, a, d in (("dO, V bf16", A, da3(bf(dO), bf(v))),
                               ("+ A bf16", bf(A), da3(bf(dO), bf(v))),
                               ("+ dA3 bf16", bf(A), bf(da3(bf(dO), bf(v))))):
                print(f"  dMpost, {name:10s}: rel err {rel(dmpost(a, d, g), ref):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
