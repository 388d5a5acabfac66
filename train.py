"""The command line of llm.

    python train.py                      all stages in order on the embedded data
    python train.py pretrain [--data F]  one stage alone (see --help)

Every stage reads the previous stage's checkpoint from the run folder (--out)
and writes its own there.
"""
import argparse
import json
import os
import sys

import llm

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CORPUS = os.path.join(HERE, "data", "corpus.txt")


def add_model_flags(p):
    g = p.add_argument_group("model (nanoGPT's names)")
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--n-embd", type=int, default=128)
    g.add_argument("--block-size", type=int, default=64)
    g.add_argument("--vocab-size", type=int, default=260,
                   help="260 = bytes + 4 special tokens (no merges); more trains BPE merges")
    g.add_argument("--dropout", type=float, default=0.0)


def add_train_flags(p, **defaults):
    g = p.add_argument_group("training")
    d = {**vars(llm.TrainConfig()), **defaults}
    for name in ("batch_size", "max_iters", "warmup_iters", "eval_interval", "eval_iters", "seed",
                 "grad_accum"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=d[name])
    for name in ("learning_rate", "min_lr", "beta2", "weight_decay", "grad_clip"):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=d[name])


def train_config(a) -> llm.TrainConfig:
    return llm.TrainConfig(**{k: getattr(a, k) for k in vars(llm.TrainConfig())})


def cmd_pretrain(a):
    path = a.data or DEFAULT_CORPUS
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"--data: cannot read {path}: {e}")
    cfg = llm.GPTConfig(a.n_layer, a.n_head, a.n_embd, a.block_size, a.vocab_size,
                        dropout=a.dropout)
    tc = train_config(a)
    print(f"pretraining on {path} ({len(text):,} characters), "
          f"{a.n_layer} layers x {a.n_embd} wide, {a.n_head} heads, context {a.block_size}")
    bpt = None  # the progress line shows bits per byte once the tokenizer is known
    progress = llm.Progress("pretrain", bpt)
    m = llm.pretrain(text, a.out, cfg, tc, resume=a.resume, log=progress,
                     on_ready=lambda bytes_per_token: setattr(progress, "bpt", bytes_per_token))
    if m:
        print(json.dumps(m, indent=2))
        print(f"checkpoint: {os.path.join(a.out, 'pretrain.safetensors')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    sp = sub.add_parser("pretrain", help="learn language from a text file")
    sp.add_argument("--data", help="a UTF-8 text file (default: the embedded corpus)")
    sp.add_argument("--out", default="runs/default", help="the run folder")
    sp.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    add_model_flags(sp)
    add_train_flags(sp)
    a = p.parse_args(argv)
    if a.cmd is None:
        a = p.parse_args(["pretrain"] + (argv or sys.argv[1:]))
    {"pretrain": cmd_pretrain}[a.cmd](a)


if __name__ == "__main__":
    main()
