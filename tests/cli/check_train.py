#!/usr/bin/env python3
"""End-to-end checks of `mta train` / `mta eval` on a tiny config:

1. Exact resume: a run killed (SIGKILL) after its first checkpoint and resumed with --resume logs
   exactly the losses of an uninterrupted run (same config, same threads), for each attention kind.
2. Bad configs are refused with one line naming the problem and exit status 2: unknown keys, heads
   that do not divide, kq layer out of range, missing file, invalid JSON; a corrupt checkpoint is
   refused by `mta eval` and by `--resume`.
3. `mta eval` of the final checkpoint reproduces the run's last evaluation.

    /usr/bin/python3 tests/cli/check_train.py --mta build/src/mta
Prints 'N passed, M failed'.
"""
import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + detail}", flush=True)


def tiny_config(out_dir, attention, steps=12):
    return {
        "name": "tiny", "out_dir": str(out_dir), "seed": 7,
        "model": {"vocab_size": 30, "dim": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 40,
                  "ffn_multiple_of": 16, "dropout": 0.1, "attention": attention},
        "task": {"name": "blocks", "n": 3, "l": 2, "variant": "all", "length": 30},
        "train": {"steps": steps, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup": 3,
                  "schedule": "cosine", "log_every": 1, "eval_every": 5, "eval_examples": 40,
                  "checkpoint_every": 3, "threads": 2},
    }


def losses(out_dir):
    rows = [json.loads(l) for l in (pathlib.Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("kind") != "eval"], \
           [(r["step"], r["error_rate"], r["loss"]) for r in rows if r.get("kind") == "eval"]


def run(mta, args, **kw):
    return subprocess.run([mta] + args, capture_output=True, text=True, **kw)


def write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(path)


def resume_case(mta, tmp, name, attention, train_overrides=None):
    full_dir, killed_dir = tmp / f"{name}-full", tmp / f"{name}-killed"
    steps = 40

    def cfg(out_dir):
        c = tiny_config(out_dir, attention, steps)
        c["train"].update(train_overrides or {})
        return c

    full_cfg = write(tmp / f"{name}-full.json", cfg(full_dir))
    killed_cfg = write(tmp / f"{name}-killed.json", cfg(killed_dir))
    r = run(mta, ["train", full_cfg])
    check(f"{name}: uninterrupted run", r.returncode == 0, r.stderr)
    # Start the second run and kill it once a checkpoint exists and a few more steps were logged.
    p = subprocess.Popen([mta, "train", killed_cfg], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed_dir / "checkpoint.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if ckpt.exists() and (killed_dir / "metrics.jsonl").exists():
            done = len((killed_dir / "metrics.jsonl").read_text().splitlines())
            if done >= 5:
                break
        time.sleep(0.01)
    killed = p.poll() is None
    if killed:
        p.send_signal(signal.SIGKILL)
    p.wait()
    check(f"{name}: run killed mid-way", killed, "the run finished before it could be killed")
    before = len(losses(killed_dir)[0])
    r = run(mta, ["train", killed_cfg, "--resume"])
    check(f"{name}: resumed run", r.returncode == 0 and "resuming from" in r.stdout, r.stdout[-500:] + r.stderr)
    a, ea = losses(full_dir)
    b, eb = losses(killed_dir)
    diff = [(x, y) for x, y in zip(a + [None] * len(b), b + [None] * len(a)) if x != y]
    check(f"{name}: resumed losses identical to uninterrupted ({len(a)} steps, killed after {before} logged)",
          a == b and len(a) == steps, f"{len(a)} vs {len(b)} steps, first difference: {diff[:1]}")
    check(f"{name}: resumed evaluations identical", ea == eb, f"{ea} vs {eb}")
    r = run(mta, ["eval", str(full_dir / "checkpoint.safetensors")])
    ok = r.returncode == 0
    if ok:
        e = json.loads(r.stdout)
        ok = abs(e["error_rate"] - ea[-1][1]) < 1e-12 and abs(e["loss"] - ea[-1][2]) < 1e-9
    check(f"{name}: mta eval reproduces the final evaluation", ok, r.stdout + r.stderr)


def time_limit_case(mta, tmp):
    """--time-limit stops early with an evaluation and a checkpoint; --resume then finishes the run
    with the losses of an uninterrupted one; --seed changes the run."""
    cfg = tiny_config(tmp / "tl-full", {"type": "standard"}, steps=400)
    cfg["train"].update(checkpoint_every=0, eval_every=0, log_every=1)
    full = write(tmp / "tl-full.json", cfg)
    r = run(mta, ["train", full])
    check("time-limit: reference run", r.returncode == 0, r.stderr)
    cfg["out_dir"] = str(tmp / "tl-cut")
    cut = write(tmp / "tl-cut.json", cfg)
    r = run(mta, ["train", cut, "--time-limit", "0.002"])  # 0.12 s: far fewer than 400 steps
    ref_losses, _ = losses(tmp / "tl-full")
    cut_losses, cut_evals = losses(tmp / "tl-cut")
    stopped = cut_losses[-1][0] if cut_losses else 0
    check("time-limit: stops early, evaluates, says so",
          r.returncode == 0 and 0 < stopped < 400 and cut_evals and cut_evals[-1][0] == stopped
          and "time limit" in r.stdout, f"rc {r.returncode}, stopped at {stopped}, {r.stdout[-300:]} {r.stderr}")
    r = run(mta, ["train", cut, "--resume"])
    res_losses, _ = losses(tmp / "tl-cut")
    check("time-limit: --resume finishes with the uninterrupted losses",
          r.returncode == 0 and [x for x in res_losses if x[0] > stopped] == [x for x in ref_losses if x[0] > stopped],
          r.stderr)
    cfg["out_dir"] = str(tmp / "tl-seed")
    cfg["train"]["steps"] = 3
    r = run(mta, ["train", write(tmp / "tl-seed.json", cfg), "--seed", "8"])
    seed_losses, _ = losses(tmp / "tl-seed")
    check("--seed changes the run", r.returncode == 0 and seed_losses[0][1] != ref_losses[0][1], r.stderr)


def refusal(mta, tmp, label, args, needle):
    out_dir = tmp / "refused"
    r = run(mta, args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    ok = r.returncode == 2 and len(lines) == 1 and needle in lines[0]
    check(f"refuses {label}", ok, f"exit {r.returncode}, stderr {r.stderr!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mta", required=True)
    args = ap.parse_args()
    mta = os.path.abspath(args.mta)
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        resume_case(mta, tmp, "mta", {"type": "mta", "kq_pre": {"q": 2, "k": 5}, "head_post": {"group": 2},
                                      "norm": True, "gate": True})
        resume_case(mta, tmp, "diff", {"type": "diff"})
        # Checkpoints by wall time only (train.checkpoint_minutes), as the paper-size configs also do.
        resume_case(mta, tmp, "by-time", {"type": "standard"}, {"checkpoint_every": 0, "checkpoint_minutes": 0.001})
        time_limit_case(mta, tmp)

        def cfg_with(path, mutate):
            c = tiny_config(tmp / "refused", {"type": "standard"})
            mutate(c)
            return write(tmp / path, c)

        refusal(mta, tmp, "an unknown key", ["train", cfg_with("a.json", lambda c: c["train"].update(lr_max=1))],
                "train.lr_max: unknown field")
        refusal(mta, tmp, "heads that do not divide dim",
                ["train", cfg_with("b.json", lambda c: c["model"].update(n_heads=3))], "model.n_heads: must divide dim")
        refusal(mta, tmp, "a kq layer out of range",
                ["train", cfg_with("c.json", lambda c: c["model"].update(attention={"type": "mta", "kq_pre": {"q": 2, "k": 3}, "kq_layers": [0, 2]}))],
                "model.attention.kq_layers: layer 2 is out of range")
        refusal(mta, tmp, "a group that does not divide heads",
                ["train", cfg_with("d.json", lambda c: c["model"].update(attention={"type": "mta", "head_pre": {"group": 3}}))],
                "model.attention.head_pre.group")
        refusal(mta, tmp, "a sequence longer than max_seq_len",
                ["train", cfg_with("e.json", lambda c: c["model"].update(max_seq_len=10))], "model.max_seq_len")
        refusal(mta, tmp, "a missing config file", ["train", str(tmp / "nope.json")], "nope.json")
        refusal(mta, tmp, "invalid JSON", ["train", write(tmp / "f.json", "{\"name\": ")], "not valid JSON")
        refusal(mta, tmp, "an unknown task", ["train", cfg_with("g.json", lambda c: c["task"].update(name="copy"))],
                "task.name")
        refusal(mta, tmp, "a bad task field", ["train", cfg_with("h.json", lambda c: c["task"].update(n=30))], "task.n")
        refusal(mta, tmp, "a missing checkpoint", ["eval", str(tmp / "none.safetensors")], "none.safetensors")
        good = tmp / "mta-full" / "checkpoint.safetensors"
        blob = good.read_bytes()
        (tmp / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
        refusal(mta, tmp, "a truncated checkpoint", ["eval", str(tmp / "cut.safetensors")], "cut.safetensors")
        # --resume with a truncated checkpoint in place: refused, and the file is left as it was.
        cfg = tiny_config(tmp / "cutrun", {"type": "standard"})
        (tmp / "cutrun").mkdir()
        (tmp / "cutrun" / "checkpoint.safetensors").write_bytes(blob[:1000])
        refusal(mta, tmp, "--resume from a truncated checkpoint", ["train", write(tmp / "i.json", cfg), "--resume"],
                "checkpoint.safetensors")
        check("truncated checkpoint left untouched", (tmp / "cutrun" / "checkpoint.safetensors").read_bytes() == blob[:1000])
    passed = sum(RESULTS)
    print(f"{passed} passed, {len(RESULTS) - passed} failed")
    sys.exit(0 if passed == len(RESULTS) else 1)


if __name__ == "__main__":
    main()
