#!/usr/bin/env python3
"""End-to-end checks of `mta generate` on tiny toy checkpoints trained here for a few steps:

1. For each attention kind, greedy generation prints max-new characters of the task's alphabet, and
   the same with --no-cache (the full forward pass at every token); sampling with a seed repeats.
2. Bad input is refused with one line and exit status 2: a missing checkpoint, a character outside the
   task's alphabet, a negative temperature, --top-k without a temperature.

    /usr/bin/python3 tests/cli/check_generate.py --mta build/src/mta
Prints 'N passed, M failed'.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

RESULTS = []
ALPHABET = set("abcdefghijklmnopqrstuvwxyz.#_^?")


def check(name, ok, detail=""):
    RESULTS.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + detail}", flush=True)


def run(mta, args):
    # One thread: the models are tiny, and on a busy machine OpenMP's spinning threads only add time.
    return subprocess.run([mta] + args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_tiny(mta, tmp, name, attention):
    out_dir = tmp / name
    cfg = {
        "name": name, "out_dir": str(out_dir), "seed": 3,
        "model": {"vocab_size": 30, "dim": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 48,
                  "ffn_multiple_of": 16, "attention": attention},
        "task": {"name": "blocks", "n": 3, "l": 2, "variant": "all", "length": 30},
        "train": {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup": 2, "log_every": 3, "eval_examples": 16,
                  "checkpoint_every": 0, "threads": 1},
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    r = run(mta, ["train", str(path)])
    check(f"{name}: trained a tiny checkpoint", r.returncode == 0, r.stderr)
    return str(out_dir / "checkpoint.safetensors")


def refusal(mta, label, args, needle):
    r = run(mta, args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    ok = r.returncode == 2 and len(lines) == 1 and needle in lines[0] and r.stdout == ""
    check(f"refuses {label}", ok, f"exit {r.returncode}, stdout {r.stdout!r}, stderr {r.stderr!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mta", required=True)
    mta = os.path.abspath(ap.parse_args().mta)
    prompt = "abc.dey.fgh.ijk.lmn.opq#gf"
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        ckpts = {}
        for name, attention in [("standard", {"type": "standard"}), ("diff", {"type": "diff"}),
                                ("mta", {"type": "mta", "kq_pre": {"q": 2, "k": 3}, "kq_post": {"q": 2, "k": 3},
                                         "head_pre": {"group": 2}, "norm": True, "gate": True})]:
            ckpt = ckpts[name] = train_tiny(mta, tmp, name, attention)
            r = run(mta, ["generate", ckpt, "--prompt", prompt, "--max-new", "12"])
            text = r.stdout.rstrip("\n")
            check(f"{name}: greedy generation prints 12 characters of the alphabet",
                  r.returncode == 0 and len(text) == 12 and set(text) <= ALPHABET, r.stdout + r.stderr)
            r2 = run(mta, ["generate", ckpt, "--prompt", prompt, "--max-new", "12", "--no-cache"])
            check(f"{name}: --no-cache generates the same text", r2.returncode == 0 and r2.stdout == r.stdout,
                  f"{r.stdout!r} vs {r2.stdout!r} {r2.stderr}")
            sample = ["generate", ckpt, "--prompt", prompt, "--max-new", "12", "--temperature", "1.2",
                      "--top-k", "8", "--seed", "5"]
            s1, s2 = run(mta, sample), run(mta, sample)
            check(f"{name}: sampling with a seed repeats", s1.returncode == 0 and s1.stdout == s2.stdout,
                  s1.stdout + s1.stderr + s2.stdout)
        # The prompt is 28 tokens (BOS, one padding token, 26 characters); a sequence of max_seq_len = 48
        # tokens still predicts one more, so 21 tokens fit. Said on stderr, exit 0.
        r = run(mta, ["generate", ckpts["standard"], "--prompt", prompt, "--max-new", "40"])
        text = r.stdout.rstrip("\n")
        check("stops at model.max_seq_len", r.returncode == 0 and len(text) == 21 and "max_seq_len" in r.stderr,
              f"{len(text)} characters, stderr {r.stderr!r}")

        ckpt = ckpts["mta"]
        refusal(mta, "a missing checkpoint", ["generate", str(tmp / "none.safetensors"), "--prompt", "ab"],
                "none.safetensors")
        refusal(mta, "a character outside the alphabet", ["generate", ckpt, "--prompt", "abc.dEf#ab"],
                "character 'E' at position 5")
        refusal(mta, "a negative temperature", ["generate", ckpt, "--prompt", "ab", "--temperature", "-1"],
                "temperature")
        refusal(mta, "--top-k without a temperature", ["generate", ckpt, "--prompt", "ab", "--top-k", "3"], "top_k")
        refusal(mta, "a missing --prompt", ["generate", ckpt], "--prompt")
    passed = sum(RESULTS)
    print(f"{passed} passed, {len(RESULTS) - passed} failed")
    sys.exit(0 if passed == len(RESULTS) else 1)


if __name__ == "__main__":
    main()
