#!/usr/bin/env python3
"""End-to-end check of the language-modelling commands on a small generated corpus (no network):

1. `mta tokenizer train` and `mta tokenize` build a tokenizer and train/valid shards.
2. `mta train` of configs/lm/cpu-tiny.json (pointed at those files, shortened) logs losses and
   evaluates perplexity per validation group; a run stopped after half its steps and resumed with
   --resume logs exactly the same losses and evaluations.
3. `mta eval` reproduces the run's last evaluation; `mta eval --task ppl` prints the per-group
   table, and refuses a checkpoint that is not a language model.
4. Shards that do not fit are refused with one line naming the file and exit status 2: truncated,
   bad magic, another tokenizer (other merges; other vocabulary size).

    /usr/bin/python3 tests/cli/check_lm.py --mta build/src/mta
Prints 'N passed, M failed'.
"""
import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile

RESULTS = []
REPO = pathlib.Path(__file__).resolve().parents[2]
VOCAB = 320


def check(name, ok, detail=""):
    RESULTS.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + detail}", flush=True)


# One thread everywhere (the configs below also say so): on a busy machine (ctest -j) OpenMP's
# spinning threads make these tiny runs crawl, and `mta eval` then sums in the training's order.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(mta, args):
    return subprocess.run([mta] + [str(a) for a in args], capture_output=True, text=True, env=ENV)


def make_corpus(root):
    """Two groups with their own words; train and valid hold different documents."""
    words = {"prose": "the old man walked to the sea and watched the boats come home at night".split(),
             "lists": "one two three apples pears plums red green blue 7 12 2024".split()}
    rng = random.Random(5)
    for split, docs in (("train", 5), ("valid", 2)):
        for group, ws in words.items():
            for d in range(docs):
                lines = []
                for _ in range(50):
                    lines.append(" ".join(rng.choice(ws) for _ in range(rng.randint(4, 14))) + ".")
                p = root / "corpus" / split / group / f"doc{d}.txt"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("\n".join(lines) + "\n")


def losses(out_dir):
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["loss"]) for r in rows if r.get("kind") != "eval"],
            [(r["step"], r["ppl"], r["groups"]) for r in rows if r.get("kind") == "eval"])


def refused(mta, label, args, needles):
    r = run(mta, args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    ok = r.returncode == 2 and len(lines) == 1 and all(n in lines[0] for n in needles)
    check(f"refuses {label}", ok, f"exit {r.returncode}, stderr {r.stderr!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mta", required=True)
    mta = os.path.abspath(ap.parse_args().mta)
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        make_corpus(tmp)
        tok, train_bin, valid_bin = tmp / "tok" / "t.model", tmp / "shards" / "train.bin", tmp / "shards" / "valid.bin"
        r = run(mta, ["tokenizer", "train", "--input", tmp / "corpus/train", "--vocab", VOCAB, "--out", tok])
        check("mta tokenizer train", r.returncode == 0 and tok.exists(), r.stdout + r.stderr)
        for split, out in (("train", train_bin), ("valid", valid_bin)):
            r = run(mta, ["tokenize", "--tokenizer", tok, "--input", tmp / "corpus" / split, "--out", out, "--threads", 1])
            check(f"mta tokenize {split}", r.returncode == 0 and "2 groups" in r.stdout, r.stdout + r.stderr)
        again = tmp / "shards" / "valid-2-threads.bin"
        r = run(mta, ["tokenize", "--tokenizer", tok, "--input", tmp / "corpus/valid", "--out", again, "--threads", 2])
        check("mta tokenize: the same shard with 2 threads", r.returncode == 0 and again.read_bytes() == valid_bin.read_bytes(),
              r.stderr)
        r = run(mta, ["tokenizer", "encode", "--tokenizer", tok, "--text", "the old man\nwatched 12 boats"])
        check("mta tokenizer encode round trip", r.returncode == 0 and "round trip exact" in r.stdout, r.stdout + r.stderr)

        # The committed tiny config, pointed at these files and shortened.
        cfg = json.loads((REPO / "configs/lm/cpu-tiny.json").read_text())
        cfg["model"]["vocab_size"] = VOCAB
        cfg["model"]["max_seq_len"] = cfg["task"]["seq_len"] = 32
        cfg["task"].update(tokenizer=str(tok), train_shards=[str(train_bin)], valid_shards=[str(valid_bin)])
        cfg["train"].update(steps=12, eval_every=6, checkpoint_every=4, log_every=1, eval_examples=1000, threads=1)

        def write_cfg(name, out_dir):
            c = dict(cfg, out_dir=str(out_dir))
            p = tmp / f"{name}.json"
            p.write_text(json.dumps(c))
            return p

        full, half = tmp / "full", tmp / "half"
        r = run(mta, ["train", write_cfg("full", full)])
        check("mta train (lm, cpu-tiny)", r.returncode == 0 and "eval at step 12" in r.stdout, r.stdout[-800:] + r.stderr)
        a, ea = losses(full)
        check("losses logged for every step", [s for s, _ in a] == list(range(1, 13)), str(a))
        check("ppl evaluated at steps 6 and 12 with both groups",
              [s for s, _, _ in ea] == [6, 12] and all(set(g) == {"prose", "lists"} for _, _, g in ea), str(ea))
        check("training lowers the validation ppl", ea[-1][1] < ea[0][1] < VOCAB, str(ea))

        # Stopped after 6 of 12 steps (constant lr: the schedule does not depend on the step count),
        # then resumed: the batches come from the saved data position, so the losses are the same.
        half_cfg = write_cfg("half", half)
        r1 = run(mta, ["train", half_cfg, "--steps", 6])
        r2 = run(mta, ["train", half_cfg, "--resume"])
        check("resumed run", r1.returncode == 0 and r2.returncode == 0 and "resuming from" in r2.stdout,
              r1.stderr + r2.stdout[-500:] + r2.stderr)
        b, eb = losses(half)
        check("resumed losses identical to the uninterrupted run", a == b, f"{a} vs {b}")
        check("resumed evaluations identical", ea == eb, f"{ea} vs {eb}")

        ckpt = full / "checkpoint.safetensors"
        r = run(mta, ["eval", ckpt])
        ok = r.returncode == 0
        if ok:
            e = json.loads(r.stdout)
            close = lambda x, y: abs(x - y) < 1e-12 * y
            ok = close(e["ppl"], ea[-1][1]) and e["groups"].keys() == ea[-1][2].keys() and all(
                close(g["ppl"], ea[-1][2][k]["ppl"]) and g["tokens"] == ea[-1][2][k]["tokens"] for k, g in e["groups"].items())
        check("mta eval reproduces the final evaluation", ok, r.stdout + r.stderr)
        r = run(mta, ["eval", ckpt, "--task", "ppl"])
        rows = {l.split()[0] for l in r.stdout.splitlines() if l.strip()}
        check("mta eval --task ppl prints the group table",
              r.returncode == 0 and {"prose", "lists", "all", "mean"} <= rows, r.stdout + r.stderr)
        # Generation from an LM checkpoint: the prompt goes through the tokenizer; cached and
        # uncached decoding agree.
        gen = [run(mta, ["generate", ckpt, "--prompt", "the sea", "--max-new", 12] + extra) for extra in ([], ["--no-cache"])]
        check("mta generate on an LM checkpoint, with and without the cache",
              all(g.returncode == 0 for g in gen) and gen[0].stdout == gen[1].stdout and gen[0].stdout.strip() != "",
              " | ".join(g.stdout + g.stderr for g in gen))

        blocks = tmp / "blocks.json"
        blocks.write_text(json.dumps({
            "name": "b", "out_dir": str(tmp / "blocks"),
            "model": {"vocab_size": 30, "dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 40, "ffn_multiple_of": 16,
                      "attention": {"type": "standard"}},
            "task": {"name": "blocks", "n": 3, "l": 2, "length": 30},
            "train": {"steps": 1, "batch_size": 2, "lr": 1e-3, "eval_examples": 4, "threads": 1}}))
        r = run(mta, ["train", blocks])
        check("tiny blocks run", r.returncode == 0, r.stderr)
        refused(mta, "--task ppl for a blocks checkpoint", ["eval", tmp / "blocks/checkpoint.safetensors", "--task", "ppl"],
                ["not a language model"])

        # Shards that do not fit.
        data = valid_bin.read_bytes()
        cut = tmp / "cut.bin"
        cut.write_bytes(data[:-3])
        bad = dict(cfg)
        bad["task"] = dict(cfg["task"], valid_shards=[str(cut)])
        p = tmp / "bad1.json"
        p.write_text(json.dumps(dict(bad, out_dir=str(tmp / "bad1"))))
        refused(mta, "a truncated shard", ["train", p], [str(cut), "truncated"])
        junk = tmp / "junk.bin"
        junk.write_bytes(b"PK\x03\x04" + data[4:])
        bad["task"] = dict(cfg["task"], train_shards=[str(junk)])
        p.write_text(json.dumps(dict(bad, out_dir=str(tmp / "bad1"))))
        refused(mta, "a shard with a bad magic", ["train", p], [str(junk), "bad magic"])
        # Another tokenizer: trained on one group only (same size, other merges), or another size.
        for label, vocab, corpus, needle in (("another tokenizer's shard", VOCAB, "corpus/train/prose", "checksum"),
                                             ("another vocabulary's shard", VOCAB + 20, "corpus/train", "vocabulary size")):
            other = tmp / f"other-{vocab}.model"
            r = run(mta, ["tokenizer", "train", "--input", tmp / corpus, "--vocab", vocab, "--out", other])
            bad["task"] = dict(cfg["task"], tokenizer=str(other))
            p.write_text(json.dumps(dict(bad, out_dir=str(tmp / "bad1"))))
            refused(mta, label, ["train", p], [str(train_bin), needle])
        refused(mta, "tokenize without a corpus folder",
                ["tokenize", "--tokenizer", tok, "--input", tmp / "nope", "--out", tmp / "x.bin"], ["nope", "not a folder"])
        check("no shard written by the refused tokenize", not (tmp / "x.bin").exists())
        refused(mta, "a model vocabulary smaller than the tokenizer's",
                ["train", _small_vocab(tmp, cfg)],
                ["model.vocab_size"])

    passed = sum(RESULTS)
    print(f"{passed} passed, {len(RESULTS) - passed} failed")
    sys.exit(0 if passed == len(RESULTS) else 1)


def _small_vocab(tmp, cfg):
    c = json.loads(json.dumps(cfg))
    c["model"]["vocab_size"] = VOCAB - 1
    c["out_dir"] = str(tmp / "small")
    p = tmp / "small.json"
    p.write_text(json.dumps(c))
    return p


if __name__ == "__main__":
    main()
