"""The smallest toy-task run config the CLI tests train (1 layer, dim 16, 50 steps, 1 thread)."""


def tiny_config(name, attention):
    return {"name": name, "seed": 1,
            "model": {"vocab_size": 30, "dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 40,
                      "ffn_multiple_of": 16, "attention": attention},
            "task": {"name": "blocks", "n": 3, "l": 2, "length": 30},
            "train": {"steps": 50, "batch_size": 4, "lr": 1e-3, "eval_examples": 8, "threads": 1}}
