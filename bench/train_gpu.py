#!/usr/bin/env python3
"""GPU training throughput: mta against the same models in PyTorch on the same GPU, in one run.

    python3 bench/train_gpu.py [--mta .device/mta] [--configs a.json,b.json] [--seq 2048] [--batch 8] [--gpus N]

For each config (default: configs/bench/lm-{125m,350m}-{transformer,mta}.json) it runs
`mta bench train CONFIG --device cuda` (random tokens, every position scored) and the same
architecture in PyTorch (tests/oracle/model_torch.py; bf16 autocast, fp32 master weights, fused
AdamW, torch.compile, standard attention through SDPA flash; MTA materialized, as the paper's code
does), and prints tokens/s, MFU and the ratio mta/PyTorch as a markdown table; then, for each MTA config
whose baseline (the same name with "transformer" for "mta") was measured in the run, the MTA model's
tokens/s as a fraction of its baseline's, on each side (issue 5; the paper's code: 10.5%). PyTorch's MTA needs
T x T tensors per layer: on out-of-memory the batch is halved (reported). --device cpu runs a smoke
test of the PyTorch side without compile or SDPA.

Each config runs in its own process (a fresh PyTorch: no compiled graphs or cached memory carried from
one model to the next). N workers (one per GPU; --gpus N, default every visible GPU) take the configs
from one queue in the order given, each config alone on its GPU while it runs, so one call of a few
minutes measures all four models. The default order puts the slowest (the 350M MTA) first.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "oracle"))
import model_torch as mtm  # noqa: E402
import mta_binary  # noqa: E402  (bench/, the script's own folder)

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the denominator of MFU on both sides


def flops_per_token(m, n_params, T):
    """PaLM's count, as `mta bench train`: 6 x non-embedding params + 6 V C (tied output) + 12 L C T."""
    V, C, L = m["vocab_size"], m["dim"], m["n_layers"]
    return 6.0 * (n_params - V * C) + 6.0 * V * C + 12.0 * L * C * T


def bench_mta(binary, cfg_path, B, T, steps, device):
    out = subprocess.run([binary, "bench", "train", cfg_path, "--device", device, "--batch", str(B), "--seq", str(T),
                          "--steps", str(steps)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_torch(cfg, B, T, steps, warmup, device, compile_model):
    m, tr = cfg["model"], cfg["train"]
    torch.manual_seed(0)
    params = {n: p.to(device).requires_grad_(True) for n, p in mtm.init_params(m, None, torch.float32).items()}
    shapes = mtm.param_shapes(m)
    groups = [{"params": [p for n, p in params.items() if shapes[n][1]], "weight_decay": float(tr.get("weight_decay", 0))},
              {"params": [p for n, p in params.items() if not shapes[n][1]], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=float(tr["lr"]), betas=(float(tr.get("beta1", 0.9)), float(tr.get("beta2", 0.95))),
                            eps=float(tr.get("eps", 1e-8)), **({"fused": True} if device == "cuda" else {}))
    V = int(m["vocab_size"])
    inputs = torch.randint(0, V, (B, T), device=device)
    targets = torch.randint(0, V, (B, T), device=device)
    weights = torch.ones(B, T, device=device)

    def loss_of(inp, tgt, w):
        return mtm.loss_fn(m, params, inp, tgt, w, training=False)

    fn = torch.compile(loss_of) if compile_model else loss_of

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = fn(inputs, targets, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), float(tr.get("grad_clip", 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in params.values())
    tok_s = B * T / statistics.median(times)
    return tok_s, n_params


def measure_config(args, path):
    """One config, both sides, in this process: a dict for the table."""
    on_gpu = args.device == "cuda"
    cfg = json.loads(pathlib.Path(path).read_text())
    name = pathlib.Path(path).stem
    t0 = time.time()
    mj = bench_mta(args.mta, path, args.batch, args.seq, args.steps, args.device)
    print(f"[{name}] mta: {mj['tokens_per_s']:,.0f} tok/s ({time.time() - t0:.0f} s); PyTorch next (compile included)",
          file=sys.stderr, flush=True)
    t0 = time.time()
    B, torch_res = args.batch, None
    while B >= 1 and torch_res is None:
        try:
            torch_res = bench_torch(cfg, B, args.seq, args.steps, args.warmup, args.device,
                                    on_gpu and not args.no_compile)
        except torch.cuda.OutOfMemoryError if on_gpu else MemoryError:
            torch.cuda.empty_cache()
            B //= 2
    print(f"[{name}] PyTorch done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    r = {"name": name, "params": mj["params"], "mta_tok_s": mj["tokens_per_s"], "mta_mfu": mj.get("mfu", 0),
         "torch_batch": B if torch_res else None, "torch_tok_s": None, "torch_mfu": None}
    if torch_res:
        tok_s, n_params = torch_res
        r["torch_tok_s"] = tok_s
        r["torch_mfu"] = flops_per_token(cfg["model"], n_params, args.seq) * tok_s / (PEAK_TFLOPS * 1e12)
    return r


def run_queues(args, paths):
    """Each config in a child process (`--one CONFIG`); args.gpus workers, one per GPU
    (CUDA_VISIBLE_DEVICES), take the next config from one shared queue when their GPU is free, so list
    the longest first. Returns the results in the order of `paths` (None where a child failed)."""
    results = [None] * len(paths)
    tmp = tempfile.mkdtemp(prefix="train_gpu_")
    queue = list(range(len(paths)))
    lock = threading.Lock()

    def worker(gpu):
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, __file__, "--one", paths[i], "--json-out", out, "--mta", args.mta,
                   "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--device", args.device] + (["--no-compile"] if args.no_compile else [])
            env = dict(os.environ)
            if args.device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            rc = subprocess.run(cmd, env=env).returncode
            if rc == 0 and os.path.exists(out):
                r = results[i] = json.loads(pathlib.Path(out).read_text())
                torch_part = f"{r['torch_tok_s']:,.0f} tok/s (batch {r['torch_batch']})" if r["torch_tok_s"] else "OOM"
                print(f"[{r['name']}] gpu {gpu}: mta {r['mta_tok_s']:,.0f} tok/s, PyTorch {torch_part}",
                      file=sys.stderr, flush=True)
            else:
                print(f"[{pathlib.Path(paths[i]).stem}] failed (exit {rc})", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker, args=(g,)) for g in range(min(args.gpus, len(paths)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mta", default=str(ROOT / ".device" / "mta"))
    ap.add_argument("--configs", default=",".join(str(ROOT / "configs" / "bench" / f"lm-{n}.json")
                                                  for n in ("350m-mta", "125m-mta", "350m-transformer",
                                                            "125m-transformer")))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--gpus", type=int, default=0,
                    help="GPUs to spread the configs over, one queue per GPU (default: every visible GPU)")
    ap.add_argument("--one", help=argparse.SUPPRESS)       # child: measure this config only
    ap.add_argument("--json-out", help=argparse.SUPPRESS)  # child: write its result here
    args = ap.parse_args()
    mta_binary.require(args.mta, __file__)
    on_gpu = args.device == "cuda"
    mtm.USE_SDPA = on_gpu and hasattr(torch.nn.functional, "scaled_dot_product_attention")
    if args.one:
        pathlib.Path(args.json_out).write_text(json.dumps(measure_config(args, args.one)))
        return
    if args.gpus == 0:
        args.gpus = max(1, torch.cuda.device_count()) if on_gpu else 1
    if args.gpus < 1:
        ap.error("--gpus must be >= 1")
    print(f"# training throughput, {torch.cuda.get_device_name() if on_gpu else 'cpu'}, torch {torch.__version__}, "
          f"T={args.seq}, median of {args.steps} steps after {args.warmup}")
    print("| config | params | batch (mta / torch) | mta tok/s | mta MFU | torch tok/s | torch MFU | mta / torch |")
    print("|---|---|---|---|---|---|---|---|")
    measured = {}  # config name -> (mta tok/s, PyTorch tok/s or None)
    paths = args.configs.split(",")
    results = run_queues(args, paths)
    for path, r in zip(paths, results):
        name = pathlib.Path(path).stem
        if r is None:
            print(f"| {name} | - | - | failed | - | - | - | - |", flush=True)
            continue
        if r["torch_tok_s"] is None:
            print(f"| {name} | {r['params']:,} | {args.batch} / OOM at 1 | {r['mta_tok_s']:,.0f} | "
                  f"{r['mta_mfu']:.1%} | OOM | - | - |", flush=True)
            measured[name] = (r["mta_tok_s"], None)
            continue
        print(f"| {name} | {r['params']:,} | {args.batch} / {r['torch_batch']} | {r['mta_tok_s']:,.0f} | "
              f"{r['mta_mfu']:.1%} | {r['torch_tok_s']:,.0f} | {r['torch_mfu']:.1%} | "
              f"{r['mta_tok_s'] / r['torch_tok_s']:.2f}x |", flush=True)
        measured[name] = (r["mta_tok_s"], r["torch_tok_s"])
    failed = [pathlib.Path(p).stem for p, r in zip(paths, results) if r is None]
    for name, (m_tok, t_tok) in measured.items():
        base = measured.get(name.replace("mta", "transformer")) if "mta" in name else None
        if base is None:
            continue
        torch_part = f"{t_tok / base[1]:.1%}" if t_tok and base[1] else "-"
        print(f"\n{name}: MTA tokens/s as a fraction of the baseline's: mta {m_tok / base[0]:.1%}, "
              f"PyTorch {torch_part} (the paper's code: 10.5%; issue 5's goal for mta: >= 75%)", flush=True)
    if failed:
        print(f"train_gpu.py: {len(failed)} config(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
