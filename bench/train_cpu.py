#!/usr/bin/python3
"""CPU training throughput of the toy models: `mta train` against the same models in PyTorch on the CPU
with the same thread count, in one run.

    /usr/bin/python3 bench/train_cpu.py [--mta build/src/mta] [--threads N] [--steps S]
                                        [--configs A.json,B.json] [--batch-size B]

Configs: configs/toy/cpu-transformer.json and configs/toy/cpu-mta.json, or --configs. While the cpu-*
configs do not exist, configs/toy/paper-transformer.json and paper-mta.json are used with a batch of 8
(their 64 x 319 tokens take ~10-30 s a step on 2 cores); --batch-size B overrides train.batch_size
(and drops micro-batching) for both sides.

mta: a copy of the config with train.log_every = 1, eval_every = 0, eval_examples small and
checkpoint_every = 0 is written to a temporary folder and run as `mta train COPY --steps S --threads N
--out TMP` with OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = N; the result is the median `tokens_per_s`
of TMP/metrics.jsonl over the steps after the first (the final evaluation and checkpoint are outside
those windows; a window does include the C++ data generation of its batch).
PyTorch: tests/oracle/model_torch.py with the same config (dropout on attention weights and residual
branches, training mode), torch.optim.AdamW(lr, betas, eps, weight_decay on the matrices only, as
mta does), the same batch size (and micro-batching) and sequence length as the task, random token
batches with the loss on the last label_len positions, generated before timing; after 2 warm-up steps,
S steps of forward, backward, clip_grad_norm and step are timed: tokens/s = B * T * S / time.
torch.set_num_threads(N).

Prints a markdown table: config | params | mta tokens/s | torch tokens/s | ratio (mta/torch).
Run with Debian's /usr/bin/python3 (python3-torch).
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "oracle"))
import model_torch as mtm  # noqa: E402

DEFAULT_CONFIGS = ["configs/toy/cpu-transformer.json", "configs/toy/cpu-mta.json"]
FALLBACK_CONFIGS = ["configs/toy/paper-transformer.json", "configs/toy/paper-mta.json"]


def task_shape(task):
    """(sequence length T, label_len) of the task section (the blocks task only)."""
    if task.get("name") != "blocks":
        raise SystemExit(f"train_cpu.py: only the blocks task is supported (got {task.get('name')!r})")
    n = int(task.get("n", 5))
    variant = task.get("variant", "all")
    length = int(task.get("length", 319))
    return length, (n if variant == "all" else 1)


def bench_mta(binary, cfg, steps, threads, tmp):
    c = json.loads(json.dumps(cfg))
    t = c.setdefault("train", {})
    t["log_every"] = 1
    t["eval_every"] = 0
    t["eval_examples"] = 8
    t["eval_batch_size"] = 8
    t["checkpoint_every"] = 0
    path = os.path.join(tmp, "config.json")
    out = os.path.join(tmp, "run")
    with open(path, "w") as f:
        json.dump(c, f, indent=2)
    # OpenBLAS threads too: with the pthreads build of OpenBLAS (not the OpenMP one), mta's GEMMs
    # would otherwise run on every core whatever --threads says.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    cmd = [binary, "train", path, "--steps", str(steps), "--threads", str(threads), "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"train_cpu.py: {' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    rates = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if m.get("kind") == "eval" or "tokens_per_s" not in m:
                continue
            if m["step"] > 1:
                rates.append(float(m["tokens_per_s"]))
    if not rates:
        raise SystemExit("train_cpu.py: no logged steps after the first in metrics.jsonl (use --steps >= 2)")
    params = None
    for line in r.stdout.splitlines():
        if " parameters," in line:
            try:
                params = int(line.split(" parameters,")[0].split()[-1])
            except ValueError:
                pass
            break
    return statistics.median(rates), params


def bench_torch(cfg, steps, threads, warmup=2, seed=0):
    torch.set_num_threads(threads)
    m, tr = cfg["model"], cfg.get("train", {})
    T, label_len = task_shape(cfg["task"])
    Bsz = int(tr.get("batch_size", 32))
    micro = int(tr.get("micro_batch_size", 0)) or Bsz
    n_micro = Bsz // micro
    V = int(m["vocab_size"])
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.requires_grad_(True) for n, p in mtm.init_params(m, gen, torch.float32).items()}
    shapes = mtm.param_shapes(m)
    decay = [p for n, p in params.items() if shapes[n][1]]
    no_decay = [p for n, p in params.items() if not shapes[n][1]]
    wd = float(tr.get("weight_decay", 0.0))
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=float(tr["lr"]), betas=(float(tr.get("beta1", 0.9)), float(tr.get("beta2", 0.95))),
                            eps=float(tr.get("eps", 1e-8)))
    clip = float(tr.get("grad_clip", 1.0))
    weights = torch.zeros(micro, T)
    weights[:, T - label_len:] = 1.0
    # Every batch is generated before timing.
    batches = [[(torch.randint(0, V, (micro, T), generator=gen), torch.randint(0, V, (micro, T), generator=gen))
                for _ in range(n_micro)] for _ in range(warmup + steps)]
    total_w = float(weights.sum()) * n_micro

    def step(batch):
        opt.zero_grad(set_to_none=True)
        for inputs, targets in batch:
            loss = mtm.loss_fn(m, params, inputs, targets, weights, training=True) * (float(weights.sum()) / total_w)
            loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        opt.step()

    for b in batches[:warmup]:
        step(b)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    dt = time.perf_counter() - t0
    n_params = sum(p.numel() for p in params.values())
    return Bsz * T * steps / dt, n_params


def fmt(x):
    return f"{x:,.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mta", default=str(ROOT / "build" / "src" / "mta"), help="the mta binary")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--steps", type=int, default=0,
                    help="timed steps of each side (default 50; 4 with the paper-config fallback)")
    ap.add_argument("--configs", help="comma-separated training configs (default: the CPU toy configs)")
    ap.add_argument("--batch-size", type=int, default=0, help="override train.batch_size on both sides")
    args = ap.parse_args()
    if args.steps == 0:
        args.steps = 50
        if not args.configs and not all(os.path.exists(ROOT / c) for c in DEFAULT_CONFIGS):
            args.steps = 4
    if args.steps < 2:
        ap.error("--steps must be at least 2 (mta's first step is not counted)")
    if args.configs:
        configs = args.configs.split(",")
    else:
        configs = [str(ROOT / c) for c in DEFAULT_CONFIGS]
        if not all(os.path.exists(c) for c in configs):
            configs = [str(ROOT / c) for c in FALLBACK_CONFIGS]
            if not args.batch_size:
                args.batch_size = 8
                print("note: configs/toy/cpu-*.json not found; using the paper toy configs with batch 8",
                      file=sys.stderr)
    binary = os.path.abspath(args.mta)
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"train_cpu.py: {binary} is not an executable (build first, or give --mta)")

    rows = []
    for path in configs:
        with open(path) as f:
            cfg = json.load(f)
        if args.batch_size:
            cfg.setdefault("train", {})["batch_size"] = args.batch_size
            cfg["train"].pop("micro_batch_size", None)
        name = cfg.get("name", os.path.basename(path))
        T, _ = task_shape(cfg["task"])
        print(f"[{name}] batch {cfg['train'].get('batch_size')} x {T} tokens, {args.steps} steps, "
              f"{args.threads} threads ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            mta_tps, mta_params = bench_mta(binary, cfg, args.steps, args.threads, tmp)
            t1 = time.perf_counter()
        torch_tps, n_params = bench_torch(cfg, args.steps, args.threads)
        t2 = time.perf_counter()
        print(f"[{name}] mta {fmt(mta_tps)} tok/s (run {t1 - t0:.0f} s), torch {fmt(torch_tps)} tok/s "
              f"(run {t2 - t1:.0f} s)", file=sys.stderr, flush=True)
        if mta_params is not None and mta_params != n_params:
            print(f"[{name}] warning: mta reports {mta_params} parameters, the torch model has {n_params}",
                  file=sys.stderr)
        rows.append((name, n_params, mta_tps, torch_tps, cfg['train'].get('batch_size'), T))

    print(f"\nCPU training throughput: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"{args.steps} timed steps, torch {torch.__version__}\n")
    print("| config | params | mta tokens/s | torch tokens/s | ratio (mta/torch) |")
    print("|---|---:|---:|---:|---:|")
    for name, n, a, b, _, _ in rows:
        print(f"| {name} | {n:,} | {fmt(a)} | {fmt(b)} | {a / b:.2f}x |")
    print("\nTokens per step: " + ", ".join(f"{r[0]} {r[4]} x {r[5]}" for r in rows) + ".")


if __name__ == "__main__":
    main()
