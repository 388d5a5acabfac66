"""The command line of llm: the four training stages, on the embedded data.

    python train.py               every stage in order, then the report card
    python train.py --quick       the same, small: a complete run in seconds
    python train.py pretrain      one stage alone: pretrain, sft, reward, ppo, dpo,
                                  finetune (each reads the previous stage's checkpoint
                                  from the run folder --out and writes its own)
    mpirun -n 2 python train.py   any of these on 2 processes, data-parallel (needs mpi4py)

`python train.py STAGE --help` lists a stage's flags.

Looking inside a trained model (the run folder's checkpoints, or --gpt2 DIR):

    python train.py tokens --text "playing"      how text becomes token ids
    python train.py sample --prompt "The" --top 5 next-token probabilities, then sampling
    python train.py attention --text "..."        where each token looks (+ an SVG heatmap)
    python train.py chat                          talk to the instruction-tuned model

The file reads in that order: the run folder and its data, the stages, the
explanation commands, the report card and its pictures, the command line.
"""
import argparse
import codecs
import copy
import hashlib
import html
import io
import json
import math
import os
import re
import shlex
import sys
import time
import traceback

import numpy


def _ensure_fastops():
    """Build the C kernels on first use (and after fastops.c changed). If
    that fails, it says so once and llm.py runs on NumPy, only slower;
    `python build_ext.py` tries again."""
    sys.path.insert(0, HERE)
    import build_ext
    if os.environ.get("LLM_NUMPY") == "1" or build_ext.built() or os.path.exists(build_ext.FAILED):
        return
    print("fastops (the C kernels) is not built for this fastops.c yet: building it with build_ext.py ...")
    build_ext.build()


HERE = os.path.dirname(os.path.abspath(__file__))
_ensure_fastops()
try:
    import llm  # noqa: E402  (after the build, so it finds the kernels)
except RuntimeError as e:                  # started by mpirun without mpi4py, or a bad LLM_MPI_TIMEOUT
    if (os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK") or "0") == "0":
        print(f"train.py: error: {e}", file=sys.stderr)       # once, not once a rank
    sys.exit(2)

DATA = os.path.join(HERE, "data")
DEFAULT_OUT = os.path.join("runs", "default")
STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "finetune")
MODEL_STAGES = ("pretrain", "sft", "ppo", "dpo", "finetune")   # the stages that write a GPT
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")   # a block's linear layers

# Sized for the stages to do their jobs (README: the figures, over seeds);
# about 7 minutes on this project's 2-core machine, within the 10 it aims
# at. --quick shrinks every stage for a complete run in seconds.
FULL = dict(n_layer=4, n_head=6, n_embd=192, block_size=64, vocab_size=2048, batch_size=16,
            learning_rate=2e-3, pretrain_iters=2000, sft_iters=1000, reward_iters=1000,
            ppo_iters=40, dpo_iters=200, finetune_iters=300, eval_limit=None)
QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=300, batch_size=12,
             learning_rate=1e-3, pretrain_iters=150, sft_iters=60, reward_iters=40, ppo_iters=3,
             dpo_iters=20, finetune_iters=40, eval_limit=24)


# ---- the run folder and the data ----------------------------------------------

class UserError(SystemExit):
    """A mistake in the command line or its files: one line on stderr and
    exit status 2 (argparse's convention), no traceback."""

    def __init__(self, message):
        super().__init__(message)
        self.code = 2


def find_checkpoint(a, prefer, why="", newest=True):
    """The checkpoint to load -> (path, the reason it was chosen), or (None,
    what is missing): --ckpt, else --stage in the run folder, else the first
    of `prefer` there, else (with newest) the run folder's newest stage
    checkpoint."""
    if getattr(a, "ckpt", None):
        return a.ckpt, "--ckpt"
    out = a.out or DEFAULT_OUT
    if getattr(a, "stage", None):
        return os.path.join(out, a.stage + ".safetensors"), f"--stage {a.stage}"
    for stage in prefer:
        path = os.path.join(out, stage + ".safetensors")
        if os.path.isfile(path):
            return path, why + "; --stage or --ckpt picks another"
    names = " or ".join(s + ".safetensors" for s in prefer)
    found = [p for p in (os.path.join(out, s + ".safetensors") for s in MODEL_STAGES) if os.path.isfile(p)]
    if not newest:
        return None, f"{out}: no {names}"
    if not found:
        return None, f"no stage checkpoint ({', '.join(s + '.safetensors' for s in MODEL_STAGES)}) in {out}"
    return max(found, key=os.path.getmtime), f"the newest stage checkpoint in {out}, which has no {names}"


def load_stage(a, *stages):
    """The model of the first of `stages` whose checkpoint is in the run
    folder -> (model, tokenizer, that stage)."""
    path, missing = find_checkpoint(a, stages, newest=False)
    if path is None:
        raise UserError(f"{missing}; run `python train.py {stages[-1]} --out {a.out}` first")
    model, tok, _, info = llm.load_checkpoint(path)
    stage, scores = os.path.basename(path)[:-len(".safetensors")], "score.weight" in model.params
    if (info.get("stage"), scores) != (stage, stage == "reward"):          # a reward model has its score head
        raise UserError(f"{path}: expected a {stage} checkpoint, got one of stage {info.get('stage')!r}"
                        f" {'with' if scores else 'without'} a score head; `python train.py {stage} --out {a.out}`"
                        " writes it again")
    return model, tok, stage


def save_stage(a, stage, model, tok, **info):
    llm.save_checkpoint(os.path.join(a.out, f"{stage}.safetensors"), model, tok, stage=stage, **info)


OPTIONAL = ("kind", "held_out", "flaw")     # strings where present: the judge's groups (data/world.py)


def read_jsonl(path: str, fields) -> list:
    """One JSON object per line, each with the given string fields, not blank
    (and the OPTIONAL ones strings where present, a flaw one of world's
    FLAWS), and a "split" of "train" (the default) or "test", and no other
    key; a pair's two answers differ, and no test prompt is a training prompt
    too. A malformed line is a ValueError naming the file and the line."""
    records, tests, trained = [], [], {}     # test (line, prompt); training prompt -> its first line
    known = (*fields, "split", *OPTIONAL)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON in UTF-8 ({e})") from None
            except RecursionError:
                raise ValueError(f"{path}:{n}: JSON nested too deeply") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {'null' if r is None else type(r).__name__}")
            for k in (*fields, *(k for k in OPTIONAL if k in r)):
                if not isinstance(r.get(k), str):
                    raise ValueError(f"{path}:{n}: expected a string field {k!r}, got {r.get(k)!r}")
                if k in fields and not r[k].strip():
                    raise ValueError(f"{path}:{n}: expected a non-empty string field {k!r}, got {r[k]!r}")
                try:
                    r[k].encode("utf-8")
                except UnicodeEncodeError as e:       # a lone surrogate: "\ud800"
                    raise ValueError(f"{path}:{n}: field {k!r} cannot be encoded as UTF-8 ({e.reason} at"
                                     f" character {e.start})") from None
            for k in r:
                if k not in known:                 # a misspelt "Split" would train a held-out row
                    raise ValueError(f"{path}:{n}: unexpected field {k!r} (expected some of: {', '.join(known)})")
            if "rejected" in fields and r["rejected"].strip() == r["chosen"].strip():
                raise ValueError(f"{path}:{n}: expected 'rejected' to differ from 'chosen', got the same answer"
                                 " (the pair teaches nothing)")
            if "flaw" in r and r["flaw"] not in world().FLAWS:   # "Unended" would get an end-of-turn token
                raise ValueError(f"{path}:{n}: expected a flaw among {', '.join(world().FLAWS)}, got {r['flaw']!r}")
            if r.get("split", "train") not in ("train", "test"):
                raise ValueError(f"{path}:{n}: expected split 'train' or 'test', got {r['split']!r}")
            if r.get("split") == "test":
                tests.append((n, r["prompt"].strip()))
            else:
                trained.setdefault(r["prompt"].strip(), n)
            records.append(r)
    for n, prompt in tests:
        if prompt in trained:
            raise ValueError(f"{path}:{n}: a test prompt that is also the training prompt of line {trained[prompt]}:"
                             " held-out figures need unseen prompts")
    return records


def data_paths(a) -> dict:
    """The data files a run reads: its flags', else the embedded ones."""
    return {k: getattr(a, k, None) or os.path.join(DATA, f) for k, f in (
        ("data", "corpus.txt"), ("sft_data", "sft.jsonl"), ("preferences_data", "preferences.jsonl"),
        ("domain_data", "domain.jsonl"))}


def read_data(a, name, fields):
    """A stage's records -> (train, test), both needed: one trains, the other measures."""
    path = data_paths(a)[name + "_data"]
    flag = f"--{name}-data"
    try:
        records = read_jsonl(path, fields)
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path} ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None
    train = [r for r in records if r.get("split", "train") == "train"]
    test = [r for r in records if r.get("split") == "test"]
    for split, rows in (("train", train), ("test", test)):
        if not rows:
            raise UserError(f'{flag}: {path} has no record with "split": "{split}" (it has {len(records)})')
    return train, test[:a.eval_limit] if a.eval_limit else test


def read_json(path, keys=()) -> dict:
    """A JSON object that a run folder (or data/) keeps, with these keys: a
    damaged file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: damaged: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise UserError(f"{path}: damaged: it lacks {', '.join(missing)}")
    return d


def read_text(a):
    """The pretraining text (--data, else the embedded corpus) -> (path, text)."""
    path = data_paths(a)["data"]
    try:
        with open(path, encoding="utf-8") as f:
            return path, f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--data: cannot read {path} as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None


def corpus_ids(a, tok, block_size, used):
    """The pretraining text as token ids, replayed by the later stages in
    windows of the context window and one token more (None where not used)."""
    if not used:
        return None
    path, text = read_text(a)
    ids = numpy.asarray(tok.encode(text), numpy.int64)
    if len(ids) < block_size + 2:
        raise UserError(f"--data: {path} has {len(ids)} tokens; replaying windows of the context window"
                        f" ({block_size}) needs at least {block_size + 2}")
    return ids


def world():
    """The judge of the embedded data (data/world.py)."""
    from data import world as w
    return w


def is_right(prompt, text, references=()) -> bool:
    """Whether an answer is right: the judge's verdict where the question
    asks a fact it knows (data/world.py); any other question (a user's own
    data) needs one of its references' answers, word for word."""
    w = world()
    if w.lookup(prompt) is not None:
        return w.is_correct(prompt, text)
    return any(w.exact_match(ref, text) for ref in references)


def is_polite(text) -> bool:
    """Whether an answer opens politely and says nothing rude, as the judge scores it."""
    return world().politeness(text) == 1.0


def train_config(a, iters, lr, batch_size=None, warmup=None):
    return llm.TrainConfig(batch_size=batch_size or a.batch_size, max_iters=iters, learning_rate=lr,
                           min_lr=lr / 10, warmup_iters=warmup if warmup is not None else max(1, iters // 20),
                           beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=max(1, iters // 4),
                           eval_iters=10, seed=a.seed)


def accuracy(model, tok, records, check):
    texts, _, _ = llm.world.map(lambda ps: llm.answers(model, tok, ps), [r["prompt"] for r in records])
    return sum(check(r, t) for r, t in zip(records, texts)) / max(len(records), 1), texts


def show_samples(title, prompts, before, after, picks=None):
    """The first five answers before and after, or picks: (index, note) pairs."""
    picks = picks if picks is not None else [(i, "") for i in range(min(5, len(prompts)))]
    rows = [{"prompt": prompts[i], "before": before[i], "after": after[i], "note": note} for i, note in picks]
    print(f"  {title}")
    for r in rows[:3]:
        print(f"    Q: {r['prompt']}{r['note'] and ' (' + r['note'] + ')'}\n      before: {r['before']!r}\n"
              f"      after:  {r['after']!r}")
    return rows


# ---- the stages -------------------------------------------------------------
# Each: load the previous stage's model, measure, train (one call of llm.py),
# save, measure again.

class Progress:
    """One updating line: step, loss, val loss, bits per byte, tokens/s,
    elapsed time and ETA."""

    def __init__(self, stage: str, bytes_per_token: float = None, stream=None):
        stream = sys.stdout if stream is None else stream      # as it is now: on ranks other than 0, nowhere
        self.stage, self.bpt, self.stream = stage, bytes_per_token, stream
        self.val = None
        self.tty = stream.isatty()
        self.last = time.time()

    def __call__(self, step, end, loss, val, tok_s, elapsed, first=0):
        if val is not None:
            self.val = val
        now = time.time()
        pause = 0.5 if self.tty else 15.0            # a log file gets a line every 15 s
        if step < end and val is None and now - self.last < pause:
            return
        self.last = now
        eta = elapsed / max(step - first, 1) * (end - step)      # from this run's own pace
        line = f"{self.stage} step {step}/{end} loss {loss:.4f}"
        if self.val is not None:
            line += f" val {self.val:.4f}"
            if self.bpt:
                line += f" bpb {llm.bits_per_byte(self.val, self.bpt):.3f}"
        line += f" | {tok_s:,.0f} tok/s | {elapsed:.0f}s elapsed, ETA {eta:.0f}s"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if step >= end else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout")


def capped(a, vocab_size) -> bool:
    """Whether --vocab-size asks for more tokens than the text has pairs to
    merge for, vocab_size: a new run would train the checkpoint's tokenizer
    (on the first 90% of the text, as llm.pretrain does)."""
    text = read_text(a)[1]
    return a.vocab_size > vocab_size == llm.Tokenizer.train(text[:int(len(text) * 0.9)], a.vocab_size).vocab_size


def resume_settings(a, ckpt):
    """--resume continues the checkpoint as it is: a model flag that says
    otherwise is an error; the training settings are the checkpoint's, save
    the ones given on the command line, which are said, each checked as its
    flag is. -> the step it resumes at."""
    try:
        model, _, state, info = llm.load_checkpoint(ckpt)
        train, ranks, t = info.get("train", {}), info.get("ranks", 1), vars(llm.TrainConfig())
        if state is None:
            raise ValueError(f"{ckpt}: no training state to resume (a checkpoint of another stage?)")
        bad = ({k: v for k, v in train.items() if k not in t or type(v) not in (type(t[k]), int)}
               if isinstance(train, dict) else {"train": train})
        if bad or type(ranks) is not int or ranks < 1:
            raise ValueError(f"{ckpt}: expected TrainConfig's settings, of its types, and ranks >= 1;"
                             f" got {str(bad)[:80]}, ranks {ranks!r}")
    except ValueError as e:
        raise UserError(f"--resume: {e}") from None
    c = model.config
    for k in MODEL_FLAGS:
        if k in a.given and getattr(a, k) != getattr(c, k) and not (k == "vocab_size" and capped(a, c.vocab_size)):
            raise UserError(f"--{k.replace('_', '-')}: {ckpt} has {k} {getattr(c, k)}, not {getattr(a, k)}: --resume"
                            f" continues it as it is (drop --{k.replace('_', '-')}, or start a new --out)")
        setattr(a, k, getattr(c, k))
    for k, v in train.items():
        if k in a.given and getattr(a, k) != v:
            print(f"  --{k.replace('_', '-')} {getattr(a, k)} replaces the checkpoint's {v}: the run no longer"
                  " continues exactly as it started")
        elif hasattr(a, k):
            setattr(a, k, v)
    check_ranges(a, train, f" (from {ckpt})")
    n = llm.world.size                                     # processes (mpirun -n) then and now
    if ranks != n:
        per_step = ranks * train.get("grad_accum", 1)      # micro-batches per step
        if "grad_accum" not in a.given:
            a.grad_accum = max(1, round(per_step / n))
        keeps = n * a.grad_accum == per_step
        print(f"  {ckpt} was trained by {ranks} rank(s) with --grad-accum {per_step // ranks}; on {n},"
              f" --grad-accum {a.grad_accum} " + (f"keeps its {per_step} micro-batches per step" if keeps else
                                                  f"makes {n * a.grad_accum} micro-batches per step, not {per_step}:"
                                                  " the run no longer continues exactly as it started"))
    print(f"[pretrain] resuming {ckpt} at step {state.step}")
    return state.step


def run_pretrain(a):
    path, text = read_text(a)
    ckpt, first = os.path.join(a.out, "pretrain.safetensors"), 0
    if a.resume and os.path.exists(ckpt):
        first = resume_settings(a, ckpt)
    elif a.resume:
        print(f"--resume: there is no {ckpt} yet: starting a new run")
    cfg = llm.GPTConfig(a.n_layer, a.n_head, a.n_embd, a.block_size, a.vocab_size, dropout=a.dropout)
    tc = llm.TrainConfig(**{k: getattr(a, k) for k in vars(llm.TrainConfig())})
    if a.min_lr is None and "min_lr" not in a.given:
        tc.min_lr = a.learning_rate / 10
    print(f"[pretrain] {path} ({len(text):,} characters); {a.n_layer} layers x {a.n_embd} wide, "
          f"{a.n_head} heads, context {a.block_size}, vocabulary {a.vocab_size}")
    progress = Progress("pretrain")

    def ready(model, bytes_per_token):
        progress.bpt = bytes_per_token
        if model.config.vocab_size < a.vocab_size:
            print(f"  --vocab-size {a.vocab_size}: the text has pairs to merge for {model.config.vocab_size}"
                  f" tokens only: the vocabulary has {model.config.vocab_size}")
    try:
        m = llm.pretrain(text, a.out, cfg, tc, resume=a.resume, log=progress, on_ready=ready)
    except llm.RanksDiffer:
        raise
    except ValueError as e:
        raise UserError(f"--data: {path}: {e}") from None
    except FloatingPointError as e:
        last = f"the last good checkpoint is {ckpt}" if os.path.exists(ckpt) else "no checkpoint was written"
        raise UserError(f"pretraining stopped: {e}; {last}") from None
    if not m:
        return None
    done = os.path.join(a.out, "pretrain.json")
    if m["steps"] == first and os.path.exists(done):     # resumed when finished: no step ran, the results stand
        with open(done) as f:
            return json.load(f)
    model, tok, state, _ = llm.load_checkpoint(os.path.join(a.out, "pretrain.safetensors"))
    prompt, block = "The capital of France is", model.config.block_size
    ids, paris = tok.encode(prompt), tok.encode(" Paris")
    ids = ids[-max(1, block - len(paris) + 1):]     # what a small context window holds
    # " Paris" may be several tokens: its probability is the product of each
    # token's probability given the ones before (the chain rule), read at once
    # where the window holds them all, else each from the window before it.
    if len(ids) + len(paris) - 1 <= block:
        logits = model.forward([ids + paris[:-1]])[0][0, len(ids) - 1:]
    else:
        logits = [model.forward([(ids + paris[:j])[-block:]])[0][0, -1] for j in range(len(paris))]
    probs = llm.next_token_probs(logits[0])
    top = [(tok.decode([int(i)]), float(probs[i])) for i in llm.xp.argsort(-probs)[:5]]
    p_word = 1.0
    for j, t in enumerate(paris):
        p_word *= float(llm.next_token_probs(logits[j])[t])
    greedy = tok.decode(llm.generate(model, ids, len(paris), temperature=0))
    m.update(prompt=prompt, top5=top, paris_prob=p_word, paris_tokens=[tok.decode([t]) for t in paris],
             greedy=greedy, paris_is_top=greedy == " Paris", history=state.history)
    print(f"  after pretraining, the next token after {prompt!r}:")
    for t, p in top:
        print(f"    {t!r:>14} {p:6.1%}")
    print(f"  greedy continuation {greedy!r}; P(' Paris') = {p_word:.1%} "
          f"(tokens {m['paris_tokens']})")
    print(f"  val loss {m['val_loss']:.3f}, {m['bits_per_byte']:.3f} bits per byte, "
          f"{m['steps']} steps, {m['tokens_per_second']:,.0f} tokens/s")
    return m


def run_sft(a):
    train, test = read_data(a, "sft", ("prompt", "response"))
    model, tok, _ = load_stage(a, "pretrain")
    replay = corpus_ids(a, tok, model.config.block_size, a.replay)
    exact = lambda r, t: world().exact_match(r["response"], t)
    before, texts0 = accuracy(model, tok, test, exact)
    print(f"[sft] {len(train)} conversations; held-out exact-match accuracy before: {before:.1%}")
    state = llm.sft(model, tok, train, train_config(a, a.sft_iters, a.sft_lr), replay, a.replay, log=Progress("sft"))
    save_stage(a, "sft", model, tok)              # before anything that reports on it
    after, texts1 = accuracy(model, tok, test, exact)
    print(f"  held-out exact-match accuracy: {before:.1%} -> {after:.1%} ({len(test)} questions)")
    groups = world().breakdown(test, [exact(r, t) for r, t in zip(test, texts1)])
    print("  by what is held out and by kind: " + ", ".join(f"{g} {r}/{n}" for g, (r, n) in groups.items()))
    novel = novel_records(a)
    novel_acc, novel_texts = accuracy(model, tok, novel, exact)
    print(f"  questions in wordings no data file uses: exact match {novel_acc:.1%} ({len(novel)})")
    return {"accuracy_before": before, "accuracy_after": after, "n_test": len(test),
            "novel_accuracy": novel_acc, "n_novel": len(novel),
            "by_group": {g: r / n for g, (r, n) in groups.items()},
            "steps": state.step, "history": state.history,
            "samples": show_samples("samples", [r["prompt"] for r in test], texts0, texts1),
            "novel_samples": [{"prompt": r["prompt"], "answer": t, "right": exact(r, t)}
                              for r, t in list(zip(novel, novel_texts))[:8]]}


def novel_records(a):
    """Questions in wordings that no data file uses (data/world.py)."""
    rows = world().novel_records()
    return rows[:a.eval_limit] if a.eval_limit else rows


def run_reward(a):
    train, test = read_data(a, "preferences", ("prompt", "chosen", "rejected"))
    model, tok, _ = load_stage(a, "sft")
    llm.add_head(model, "score", numpy.random.default_rng(a.seed))    # untrained: the baseline
    before = llm.reward_accuracy(model, tok, test)
    print(f"[reward] {len(train)} preference pairs; held-out accuracy before: {before:.1%}")
    lora = dict(r=a.reward_lora, alpha=2.0 * a.reward_lora, targets=tuple(a.lora_targets.split(",")),
                seed=a.seed) if a.reward_lora else None
    state = llm.train_reward_model(model, tok, train, train_config(a, a.reward_iters, a.reward_lr, 16), lora,
                                   log=Progress("reward"))
    save_stage(a, "reward", model, tok)
    acc = llm.reward_accuracy(model, tok, test)
    flaws = {}
    for f in sorted({r.get("flaw", "") for r in test}):
        flaws[f] = llm.reward_accuracy(model, tok, [r for r in test if r.get("flaw", "") == f])
    print(f"  held-out pair accuracy: {before:.1%} -> {acc:.1%}; by flaw: "
          + ", ".join(f"{k} {v:.0%}" for k, v in flaws.items()))
    return {"accuracy_before": before, "accuracy": acc, "by_flaw": flaws, "n_test": len(test),
            "history": state.history}


def judge_answers(model, tok, rm, prompts, refs=None):
    """Greedy answers to held-out prompts, measured: the judge's mean score,
    the reward model's mean score, and the shares of answers that are
    correct (is_right, refs: prompt -> its right answers), open politely
    (and say nothing rude) and end their turn."""
    w = world()
    texts, ended, _ = llm.world.map(lambda ps: llm.answers(model, tok, ps), prompts)   # each rank its share
    convs = [llm.chat_example(tok, p, t, e) for p, t, e in zip(prompts, texts, ended)]   # as text reads
    n = len(prompts)
    m = {"judge": sum(w.judge(p, t, e) for p, t, e in zip(prompts, texts, ended)) / n,
         "reward": sum(float(s) for s in llm.score_conversations(rm, tok, convs)) / n,
         "correct": sum(is_right(p, t, (refs or {}).get(p, ())) for p, t in zip(prompts, texts)) / n,
         "polite": sum(map(is_polite, texts)) / n,
         "ended": sum(ended) / n}
    return m, texts


def rlhf_stage(a, name, method):
    """PPO and DPO alike: start from the instruction-tuned model, measure its
    held-out answers, train, measure again, and the KL to where it started.
    method(policy, tok, train) checks what it needs, before anything is
    measured, and returns the training: (policy, ref, rm) -> its history."""
    train, test = read_data(a, "preferences", ("prompt", "chosen", "rejected"))
    policy, tok, _ = load_stage(a, "sft")
    train_policy = method(policy, tok, train)
    ref = copy.deepcopy(policy)
    rm, _, _ = load_stage(a, "reward")
    held, refs = sorted({r["prompt"] for r in test}), {}
    for r in test:
        refs.setdefault(r["prompt"], []).append(r["chosen"])
    m0, texts0 = judge_answers(policy, tok, rm, held, refs)
    print(f"[{name}] held-out answers: judge {m0['judge']:.3f}, reward {m0['reward']:+.3f}, "
          f"polite {m0['polite']:.0%}, correct {m0['correct']:.0%}")
    novel = [r["prompt"] for r in novel_records(a)]
    n0, _ = judge_answers(policy, tok, rm, novel)
    history = train_policy(policy, ref, rm)
    save_stage(a, name, policy, tok)
    m1, texts1 = judge_answers(policy, tok, rm, held, refs)
    n1, _ = judge_answers(policy, tok, rm, novel)
    kl = float(llm.kl_to_reference(policy, ref, tok, held, texts1).mean())
    print(f"  held-out judge {m0['judge']:.3f} -> {m1['judge']:.3f}, reward {m0['reward']:+.3f} -> "
          f"{m1['reward']:+.3f}, polite {m0['polite']:.0%} -> {m1['polite']:.0%}, correct "
          f"{m0['correct']:.0%} -> {m1['correct']:.0%}; KL to the reference {kl:.2f} nats per answer")
    print(f"  novel wordings: judge {n0['judge']:.3f} -> {n1['judge']:.3f}, polite {n0['polite']:.0%} -> "
          f"{n1['polite']:.0%}, correct {n0['correct']:.0%} -> {n1['correct']:.0%}")
    right0, right1 = ([is_right(p, t, refs[p]) for p, t in zip(held, texts)] for texts in (texts0, texts1))
    made_wrong = sum(r0 and not r1 for r0, r1 in zip(right0, right1))
    made_right = sum(r1 and not r0 for r0, r1 in zip(right0, right1))
    print(f"  of {len(held)} held-out answers, {made_wrong} right ones made wrong, {made_right} wrong ones made right")
    return {**{f"{k}_before": v for k, v in m0.items()}, **{f"{k}_after": v for k, v in m1.items()},
            **{f"novel_{k}_before": v for k, v in n0.items()}, **{f"novel_{k}_after": v for k, v in n1.items()},
            "kl": kl, "n_test": len(held), "made_wrong": made_wrong, "made_right": made_right, "history": history,
            "samples": show_samples("samples", held, texts0, texts1, rlhf_picks(texts0, texts1, right0, right1))}


def rlhf_picks(before, after, right0, right1):
    """Samples that show what RLHF did: answers now polite and still right,
    and the harm, right answers it made wrong (up to 3 of each; if neither,
    the first five). right0/right1: whether each answer before/after is correct."""
    good = [(i, "polite and still right") for i, (b, a) in enumerate(zip(before, after))
            if is_polite(a) and not is_polite(b) and right0[i] and right1[i]]
    broken = [(i, "right before, wrong after") for i in range(len(after)) if right0[i] and not right1[i]]
    return good[:3] + broken[:3] or None


def run_ppo(a):
    pc = llm.PPOConfig(iters=a.ppo_iters, learning_rate=a.ppo_lr, kl_coef=a.kl_coef,
                       target_kl=a.target_kl, ptx_coef=a.ptx_coef, seed=a.seed)

    def log(row, elapsed):
        print(f"  ppo iter {row['iter']}/{pc.iters} reward {row['reward']:+.3f} kl {row['kl']:.3f} "
              f"clip {row['clip_frac']:.2f} value loss {row['vf_loss']:.4f} entropy {row['entropy']:.3f}"
              f" | {elapsed:.0f}s", flush=True)
    def method(policy, tok, train):
        prompts = sorted({r["prompt"] for r in train})
        if len(prompts) < pc.prompts_per_iter:
            raise UserError(f"--preferences-data: PPO samples {pc.prompts_per_iter} training prompts per rollout,"
                            f" the file has {len(prompts)} different ones")
        replay = corpus_ids(a, tok, policy.config.block_size, pc.ptx_coef)
        return lambda policy, ref, rm: llm.ppo(policy, ref, rm, tok, prompts, pc, log=log, replay=replay)
    return rlhf_stage(a, "ppo", method)


def run_dpo(a):
    return rlhf_stage(a, "dpo", lambda _, tok, train: lambda policy, ref, rm: llm.dpo(
        policy, ref, tok, train, train_config(a, a.dpo_iters, a.dpo_lr, 8), a.dpo_beta,
        log=Progress("dpo")).history)


def run_finetune(a):
    train, test = read_data(a, "domain", ("prompt", "response"))
    general_train, general = read_data(a, "sft", ("prompt", "response"))
    share = 0.35                    # general conversations per domain one (0.2 lost up to 2.8 points of general)
    if len(general_train) < int(len(train) * share):
        raise UserError(f"--sft-data: fine-tuning mixes in {int(len(train) * share)} general conversations ({share} per"
                        f" domain one), the file has {len(general_train)} for training")
    model, tok, base = load_stage(a, "ppo", "sft")
    replay = corpus_ids(a, tok, model.config.block_size, a.finetune_replay)
    correct = lambda r, t: is_right(r["prompt"], t, [r["response"]])
    dom0, texts0 = accuracy(model, tok, test, correct)
    gen0, _ = accuracy(model, tok, general, correct)
    lora = None if a.full else dict(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                                     targets=tuple(a.lora_targets.split(",")))
    print(f"[finetune] base: {base}; {len(train)} domain conversations (+{int(len(train) * share)} general); "
          + ("all weights" if a.full else f"LoRA r={a.lora_r} alpha={a.lora_alpha} on {a.lora_targets}")
          + f"; held-out domain accuracy before {dom0:.1%}, general {gen0:.1%}")
    state = llm.finetune(model, tok, train, train_config(a, a.finetune_iters, a.finetune_lr), lora,
                         general_train, replay, a.finetune_replay, log=Progress("finetune"),
                         general_share=share)
    frac = llm.trainable_fraction(model)
    if lora:
        llm.save_lora(os.path.join(a.out, "finetune.lora.safetensors"), model)
    save_stage(a, "finetune", model, tok, base=base)      # the adapter's model, before anything reports on it
    dom1, texts1 = accuracy(model, tok, test, correct)
    gen1, _ = accuracy(model, tok, general, correct)
    print(f"  trained {frac:.2%} of the parameters; held-out domain accuracy {dom0:.1%} -> {dom1:.1%}, "
          f"general {gen0:.1%} -> {gen1:.1%}")
    groups = world().breakdown(test, [correct(r, t) for r, t in zip(test, texts1)])
    print("  domain, by what is held out and by kind: " + ", ".join(f"{g} {r}/{n}" for g, (r, n) in groups.items()))
    return {"domain_accuracy_before": dom0, "domain_accuracy_after": dom1, "trainable_fraction": frac,
            "general_accuracy_before": gen0, "general_accuracy_after": gen1, "base": base,
            "history": state.history,
            "samples": show_samples("samples", [r["prompt"] for r in test], texts0, texts1)}


RUNNERS = {"pretrain": run_pretrain, "sft": run_sft, "reward": run_reward, "ppo": run_ppo,
           "dpo": run_dpo, "finetune": run_finetune}


# ---- explanations: look inside a model --------------------------------------
# tokens, sample, attention and chat read the run folder's checkpoints (or
# GPT-2's weights with --gpt2 DIR).

def load_model(a, prefer, why):
    """(model, tokenizer) from --gpt2 or a checkpoint, saying which."""
    try:
        if a.gpt2:
            model, tok = llm.load_gpt2(a.gpt2)
            if tok is None:
                raise UserError(f"--gpt2: no .tiktoken vocabulary beside the weights in {a.gpt2}"
                         " (copy gpt2.tiktoken there)")
            c = model.config
            print(f"model: GPT-2 from {a.gpt2} ({c.n_layer} layers x {c.n_embd} wide, {c.n_head} heads,"
                  f" context {c.block_size}, {model.num_params():,} parameters)")
            return model, tok
        path, reason = find_checkpoint(a, prefer, why)
        if path is None:
            raise UserError(f"{reason}: train one first (python train.py pretrain), or pass --ckpt or --gpt2")
        model, tok, state, info = llm.load_checkpoint(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model: {e}")
    c = model.config
    step = f", step {state.step}" if state is not None else ""
    print(f"model: {path} (stage {info.get('stage', '?')}{step}; chosen: {reason})")
    print(f"       {c.n_layer} layers x {c.n_embd} wide, {c.n_head} heads, context {c.block_size},"
          f" vocabulary {c.vocab_size}, {model.num_params():,} parameters")
    return model, tok


def piece(tok, i) -> str:
    """One token shown as Python would write it: its text, or its bytes when
    they are not whole UTF-8 characters (a piece of a multi-byte character)."""
    b = tok.decode_bytes([i])
    try:
        return repr(b.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(b)


def as_flag(error) -> str:
    """llm's "name: message" errors, named as the command line names them."""
    name, _, rest = str(error).partition(": ")
    return f"--{ {'max_new_tokens': 'max_tokens'}.get(name, name).replace('_', '-')}: {rest}"


def check_sampling_flags(a):
    """--temperature, --top-k, --top-p and --max-tokens, before any model is loaded."""
    try:
        llm.check_sampling(a.temperature, a.top_k, a.top_p, a.max_tokens)
    except ValueError as e:
        raise UserError(as_flag(e)) from None


def fresh_seed(seed):
    """The seed given, or a fresh one (said, so that --seed repeats the run)."""
    return seed if seed is not None else int(numpy.random.SeedSequence().entropy % 2**31)


def encode_flag(tok, text, flag) -> list:
    """--prompt's or --text's tokens: text that is not UTF-8 (or no text) is the flag's error."""
    try:
        ids = tok.encode(text)
    except ValueError as e:
        raise UserError(f"{flag}: {str(e).partition(': ')[2]}") from None
    if not ids:
        raise UserError(f"{flag}: expected some text")
    return ids


# ---- tokens: how the tokenizer cuts text -------------------------------------

def load_tokenizer(a):
    """-> (tokenizer, where it came from): --ckpt, --gpt2, the run folder's
    checkpoint, or the byte tokenizer."""
    out = a.out or DEFAULT_OUT
    if not a.ckpt and a.gpt2:
        vocab = a.gpt2 if a.gpt2.endswith(".tiktoken") else llm.find_tiktoken(a.gpt2)
        if vocab is None:
            raise UserError(f"--gpt2: no .tiktoken file in {a.gpt2}")
        return llm.Tokenizer.from_tiktoken(vocab), f"GPT-2's vocabulary from {vocab}"
    path, reason = find_checkpoint(a, ("pretrain",), "the stages share one tokenizer")
    if path is None:
        return llm.byte_tokenizer(), (f"the byte tokenizer (no merges: one token per byte), as there is no"
                                      f" checkpoint in {out} and no --gpt2")
    try:
        _, meta = llm.load_safetensors(path)
        if meta.get("format") == "llm-lora-v1":
            raise ValueError("a LoRA adapter, not a checkpoint: its model's checkpoint has the tokenizer")
        return llm.Tokenizer.from_json(meta["tokenizer"], path), f"the tokenizer of {path} ({reason})"
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the tokenizer of {path}: {e}")


def cmd_tokens(a):
    tok, source = load_tokenizer(a)
    merges = len(tok.ranks) - 256
    print(f"tokenizer: {source}")
    print(f"           {tok.vocab_size:,} tokens: 256 bytes + {merges:,} merges + {len(tok.special)} special")
    text = a.text
    nbytes = len(text.encode("utf-8", errors="replace"))
    print(f"text: {text!r} ({len(text)} characters, {nbytes} bytes)\n")
    try:
        chunks = tok.chunks(text, allow_special=a.special)
    except ValueError as e:
        raise UserError(f"--{e}")
    print("1. pre-tokenisation cuts the text into chunks (BPE merges never cross a chunk boundary):")
    print("   " + " | ".join(repr(c) for c, _ in chunks) + "\n")
    print("2. byte-pair encoding turns each chunk into tokens:")
    rows = [(str(n) if j == 0 else "", repr(c) if j == 0 else "", piece(tok, i), str(i))
            for n, (c, ids) in enumerate(chunks) for j, i in enumerate(ids)]
    header = ("chunk", "text", "token", "id")
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(4)]
    for r in [header] + rows:
        print("   " + "  ".join(f"{v:<{w}}" if k < 3 else f"{v:>{w}}" for k, (v, w) in enumerate(zip(r, widths))))
    ids = [i for _, c in chunks for i in c]
    print(f"\nids: {ids}")
    if ids:
        print(f"{nbytes} bytes -> {len(ids)} tokens ({nbytes / len(ids):.2f} bytes per token)")


# ---- sample: the next-token distribution, then a streamed continuation -------

def stream_tokens(tok, ids, write, seen=None):
    """Write each token's text as it arrives (a character split across two
    tokens is written once complete). Returns the ids seen (also in `seen`)."""
    dec, seen = codecs.getincrementaldecoder("utf-8")(errors="replace"), [] if seen is None else seen
    for i in ids:
        seen.append(i)
        write(dec.decode(tok.decode_bytes([i])))
    write(dec.decode(b"", final=True))
    return seen


def cmd_sample(a):
    check_sampling_flags(a)
    model, tok = load_model(a, ("pretrain",), "sample continues text, so it takes the pretrained model")
    ids = encode_flag(tok, a.prompt, "--prompt")
    block = model.config.block_size
    if len(ids) > block:
        print(f"(the prompt has {len(ids)} tokens; the model sees the last {block})")
    logits = llm.to_numpy(llm.next_logits(model, [ids[-block:]], llm.KVCache())[0])
    p_model = numpy.asarray(llm.next_token_probs(logits))
    changed = a.temperature != 1.0 or a.top_k is not None or a.top_p is not None
    p_used = numpy.asarray(llm.next_token_probs(logits, a.temperature, a.top_k, a.top_p))
    print(f"\nprompt: {a.prompt!r} = {len(ids)} tokens {ids[-12:]}{' ...' if len(ids) > 12 else ''}")
    print(f"the model's probabilities for the next token (top {a.top} of {p_model.size:,}):")
    rows = [(str(r + 1), piece(tok, int(i)), str(int(i)), f"{p_model[i]:.4f}", f"{p_used[i]:.4f}")
            for r, i in enumerate(numpy.argsort(-p_model, kind="stable")[:a.top])]
    header = ("#", "token", "id", "p", "p sampled")
    n = 5 if changed else 4
    widths = [max(len(r[k]) for r in rows + [header]) for k in range(n)]
    for r in [header] + rows:
        print("  " + "  ".join(f"{v:<{w}}" if k == 1 else f"{v:>{w}}" for k, (v, w) in enumerate(zip(r[:n], widths))))
    if changed:
        print("  (p sampled: after --temperature/--top-k/--top-p)")
    seed = fresh_seed(a.seed)
    settings = [f"temperature {a.temperature:g}"] + [f"{k} {v:g}" for k, v in
                                                     (("top-k", a.top_k), ("top-p", a.top_p)) if v is not None]
    print(f"\ncontinuation ({', '.join(settings)}, seed {seed}; --seed {seed} repeats it):")
    eot = tok.special.get(llm.ENDOFTEXT)
    stop = (eot,) if eot is not None and eot < model.config.vocab_size else ()
    sys.stdout.write(a.prompt)
    sys.stdout.flush()

    def write(s):
        sys.stdout.write(s)
        sys.stdout.flush()

    t0 = time.time()
    new = stream_tokens(tok, llm.generate(model, ids, a.max_tokens, a.temperature, a.top_k, a.top_p,
                                          stop=stop, seed=seed), write)
    dt = time.time() - t0
    end = " (stopped at <|endoftext|>)" if len(new) < a.max_tokens else ""
    print(f"\n\n[{len(new)} new tokens in {dt:.2f}s, {len(new) / max(dt, 1e-9):.0f} tokens/s{end}]")


# ---- attention: where each token looks ---------------------------------------

def attention_maps(model, ids):
    """Where each token looks: ids (T,) -> the attention probabilities of
    every layer and head, an array (n_layer, n_head, T, T). Row t of
    maps[l, h] is how head h of layer l splits position t's attention over
    positions 0..t; each row sums to 1 and everything right of the diagonal
    (the future) is 0."""
    idx = llm.check_ids(ids, model.config.vocab_size, "ids")
    if idx.shape[0] != 1:
        raise ValueError(f"ids: expected one sequence, got a batch of {idx.shape[0]}")
    if idx.shape[1] > model.config.block_size:
        raise ValueError(f"ids: sequence length {idx.shape[1]} exceeds the context window"
                         f" block_size={model.config.block_size}")
    kv = llm.KVCache(maps=[])
    model.forward(idx, kv_cache=kv)
    return llm.xp.stack([att[0] for att in kv.maps])                      # (L, H, T, T)


def _layer_or_head(value, count, flag):
    """'average' (or avg/mean/all) -> None; an int, negative from the end."""
    if str(value).lower() in ("average", "avg", "mean", "all"):
        return None
    try:
        i = int(value)
    except ValueError:
        raise UserError(f"{flag}: expected a number or 'average', got {value!r}")
    if not -count <= i < count:
        raise UserError(f"{flag}: expected 0..{count - 1} (or 'average'), got {i}")
    return i % count


SHADES = " .:-=+*#%@"          # 0 .. 1, for the terminal grid


def cmd_attention(a):
    model, tok = load_model(a, ("pretrain",), "attention reads the pretrained model")
    ids = encode_flag(tok, a.text, "--text")
    L, H, block = model.config.n_layer, model.config.n_head, model.config.block_size
    if len(ids) > block:
        print(f"(the text has {len(ids)} tokens; showing the first {block}, the context window)")
        ids = ids[:block]
    layer, head = _layer_or_head(a.layer, L, "--layer"), _layer_or_head(a.head, H, "--head")
    maps = llm.to_numpy(attention_maps(model, ids)).astype(numpy.float64)   # (L, H, T, T)
    m = maps.mean(0) if layer is None else maps[layer]
    m = m.mean(0) if head is None else m[head]
    where = (f"layer {layer}" if layer is not None else f"the average of all {L} layers") + ", " + \
            (f"head {head}" if head is not None else f"the average of all {H} heads")
    labels = [piece(tok, i) for i in ids]
    print(f"\nattention of {where} ({L} layers x {H} heads; --layer L --head H picks one):")
    print("each token reads a weighted average of the tokens before it (and itself); its 3 largest weights:")
    w = max(len(s) for s in labels)
    for t in range(len(ids)):
        top = numpy.argsort(-m[t, :t + 1], kind="stable")[:3]
        print(f"  {t:>3} {labels[t]:<{w}} <- " + "  ".join(f"{labels[j]} {m[t, j]:.2f}" for j in top))
    if len(ids) <= 60:
        print(f"\nthe same as a grid (row: the reading token, column: the token read; "
              f"'{SHADES[1]}' little ... '{SHADES[-1]}' all):")
        print(" " * (w + 7) + "".join(str(j % 10) for j in range(len(ids))))
        for t in range(len(ids)):
            row = "".join(SHADES[min(len(SHADES) - 1, int(round(m[t, j] * (len(SHADES) - 1))))]
                          for j in range(len(ids)))
            print(f"  {t:>3} {labels[t]:<{w}} {row}")
    out = a.out or (os.path.dirname(os.path.abspath(a.ckpt)) if a.ckpt else DEFAULT_OUT)
    name = f"attention-layer{'avg' if layer is None else layer}-head{'avg' if head is None else head}.svg"
    path = a.svg or os.path.join(out, name)
    try:
        svg_heatmap(m, labels, labels, path, f"Attention, {where}: row reads column")
    except OSError as e:
        raise UserError(f"--svg: cannot write {path} ({e.strerror or e})") from None
    print(f"\nheatmap: {path}")


# ---- chat: a conversation with an instruction-tuned model --------------------

def chat_loop(model, tok, input_fn=input, output=None, max_tokens=200, temperature=0.8,
              top_k=None, top_p=None, seed=None):
    """Read a message with input_fn(prompt), stream the model's answer to
    output, repeat. /reset forgets the conversation, /quit (or end of input,
    or Ctrl-C at the prompt) leaves; Ctrl-C during an answer stops it. The oldest turns are left out once the conversation no longer
    fits the context window. Returns the conversation, [(user, answer)]."""
    missing = [s for s in (llm.USER, llm.ASSISTANT, llm.END) if s not in tok.special]
    if missing:
        raise ValueError(f"tokenizer: lacks the chat tokens {missing}")
    stop = llm.stop_tokens(tok)
    block = model.config.block_size
    budget = max(1, block - min(max_tokens, block // 2))     # the rest is room for the answer
    seed = fresh_seed(seed)
    rng = numpy.random.default_rng(seed)
    history = []
    output = sys.stdout if output is None else output

    def write(s):
        output.write(s)
        output.flush()

    write("chat: type a message; /reset starts over, /quit (or Ctrl-D) leaves; Ctrl-C stops an answer\n"
          + (f"(sampling with seed {seed}: --seed {seed} repeats the conversation)\n" if temperature else ""))
    while True:
        try:
            msg = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            break
        if msg in ("/quit", "/exit"):
            break
        if msg == "/reset":
            history = []
            write("(conversation cleared)\n")
            continue
        if not msg:
            continue
        try:
            msg.encode("utf-8")
        except UnicodeEncodeError:          # bytes that are not UTF-8, as input() reads them
            write("(the line is not valid UTF-8 text: type it again)\n")
            continue
        turns = list(history)
        ids = llm.chat_prompt(tok, msg, turns)
        while len(ids) > budget and turns:
            turns = turns[1:]
            ids = llm.chat_prompt(tok, msg, turns)
        if len(turns) < len(history):
            write(f"(the context window holds {block} tokens: the oldest"
                  f" {len(history) - len(turns)} turn(s) are forgotten)\n")
        if len(ids) > budget:
            write(f"(the message is too long: the model sees its last {budget} tokens)\n")
            ids = ids[-budget:]
        history = turns
        write("bot> ")
        first = [True]

        def write_answer(text):         # without the answer's own leading space (llm.encode_answer)
            if first[0] and text:
                text, first[0] = text[1:] if text.startswith(" ") else text, False
            write(text)
        answer = []
        try:
            stream_tokens(tok, llm.generate(model, ids, max_tokens, temperature, top_k, top_p,
                                            stop=stop, rng=rng), write_answer, answer)
        except KeyboardInterrupt:
            write(" (stopped)")
        write("\n")
        history.append((msg, llm.decode_answer(tok, answer)))
    return history


def cmd_chat(a):
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    check_sampling_flags(a)
    model, tok = load_model(a, ("sft", "dpo", "ppo"), "chat takes the instruction-tuned model")
    try:
        chat_loop(model, tok, input, sys.stdout, a.max_tokens, a.temperature, a.top_k, a.top_p, a.seed)
    except ValueError as e:
        raise UserError(f"chat: {e} (is this an instruction-tuned checkpoint?)")


# ---- the report card and its pictures -----------------------------------------

FIGURES = {"pretrain": ("val_loss", "bits_per_byte", "paris_prob"),        # each stage's headline numbers
           "sft": ("accuracy_before", "accuracy_after"), "reward": ("accuracy",),
           "ppo": ("judge_before", "judge_after", "reward_before", "reward_after", "kl",
                   "polite_before", "polite_after", "correct_before", "correct_after"),
           "dpo": ("judge_after", "reward_after", "kl", "polite_after", "correct_before", "correct_after"),
           "finetune": ("domain_accuracy_before", "domain_accuracy_after", "trainable_fraction",
                        "general_accuracy_before", "general_accuracy_after")}


def flat_report(report, wall):
    """The headline numbers, under the names README and the tests use."""
    flat = {f"{s}.{k}": report[s][k] for s, ks in FIGURES.items() if s in report for k in ks}
    if report.get("reward", {}).get("by_flaw"):
        flat["reward.worst_flaw"] = min(report["reward"]["by_flaw"].values())
    flat.update({f"{s}.seconds": m["seconds"] for s, m in report.items() if "seconds" in m})
    flat["wall_seconds"] = wall
    flat["kernels"] = llm.kernels_in_use()          # where fastops ran, where NumPy (measured per machine)
    return flat


SPREAD = os.path.join(DATA, "seed_spread.json")      # the default run's figures over seeds (--seeds writes it)


def recipe(a) -> dict:
    """What a run's figures depend on besides its seed and the code: its
    settings, and its data files' bytes (sha256). The spread a --seeds run
    measured is quoted only on the card of a run of the same recipe."""
    paths = data_paths(a)
    out = {k: v for k, v in sorted(vars(a).items()) if k not in (
        "out", "seed", "seeds", "device", "resume", "given", "argv", "cmd", *paths)}
    for k, path in paths.items():
        with open(path, "rb") as f:
            out[k] = hashlib.sha256(f.read()).hexdigest()[:16]
    return json.loads(json.dumps(out))          # (as read back from the file)


TARGETS = [   # README's, for the default run on the embedded data: (stage, target, met(figures))
    ("instruction tuning", "held-out exact match >= 85%", lambda f: f["sft.accuracy_after"] >= 0.85),
    ("reward model", "held-out pairs >= 95%, every flaw's >= 90%",
     lambda f: f["reward.accuracy"] >= 0.95 and f["reward.worst_flaw"] >= 0.90),
    ("PPO", "polite >= 90%, correct no lower",
     lambda f: f["ppo.polite_after"] >= 0.90 and f["ppo.correct_after"] >= f["ppo.correct_before"]),
    ("DPO", "polite >= 90%, correct no lower",
     lambda f: f["dpo.polite_after"] >= 0.90 and f["dpo.correct_after"] >= f["dpo.correct_before"]),
    ("task fine-tuning", "domain >= 85%, general within 2 points, at most 3% of the weights trained",
     lambda f: f["finetune.domain_accuracy_after"] >= 0.85 and f["finetune.trainable_fraction"] <= 0.03
     and f["finetune.general_accuracy_after"] >= f["finetune.general_accuracy_before"] - 0.02),
]


def targets_met(flat) -> list:
    """[(stage, target, met)] for the targets whose figures the run has."""
    out = []
    for stage, target, met in TARGETS:
        try:
            out.append((stage, target, bool(met(flat))))
        except KeyError:                     # that stage did not run
            pass
    return out


def write_report_card(a, report, wall, flat=None, spread=None, seeds=None):
    """report.md and report.json: one run's, or with spread = {figure: (min,
    max)} the mean of several seeds' (flat) and how far they moved. A single
    run's card gives the spread the default run had over seeds, when known:
    a run of every stage at the default sizes, all trained by this command."""
    flat = flat or flat_report(report, wall)
    default = a.cmd == "all" and not a.given - {"out", "seed", "device"}      # (not --quick, --resume, a size...)
    known = other = None
    if spread is None and default and os.path.exists(SPREAD):        # the spread is the default run's
        known = read_json(SPREAD, ("seeds", "spread"))
        if known.get("recipe") != recipe(a):                         # of edited data files, or other defaults
            known, other = None, True
    met = targets_met(flat) if default or spread else []     # (a smaller run is not held to them)
    full = {**flat, "stages": report, **({"seeds": seeds, "spread": spread, "stages_of_seed": seeds[0]} if spread else {}),
            **({"targets_met": {stage: ok for stage, _, ok in met}} if met else {})}
    llm.atomic_write(os.path.join(a.out, "report.json"), json.dumps(full, indent=2).encode())

    def f(k, fmt="{:.1%}"):
        if k not in flat:
            return "-"
        if spread:
            lo, hi = spread.get(k, (flat[k], flat[k]))
            return fmt.format(flat[k]) + f" [{fmt.format(lo)}..{fmt.format(hi)}]"
        lo, hi = (known or {}).get("spread", {}).get(k, (None, None))
        half = "" if lo is None else f" (±{fmt.replace('+', '').format((hi - lo) / 2)})"
        return fmt.format(flat[k]) + half
    rows = [
        ("pretraining", "language and knowledge", "the embedded corpus",
         f"val loss {f('pretrain.val_loss', '{:.3f}')}, {f('pretrain.bits_per_byte', '{:.3f}')} bits/byte; "
         f"after 'The capital of France is', P(' Paris') = {f('pretrain.paris_prob')}"),
        ("instruction tuning", "follow instructions", "instruction-response conversations",
         f"held-out exact match {f('sft.accuracy_before')} -> {f('sft.accuracy_after')}"),
        ("RLHF", "align with preferences", "preference pairs",
         f"reward model {f('reward.accuracy')} on held-out pairs; PPO: judged score "
         f"{f('ppo.judge_before', '{:.3f}')} -> {f('ppo.judge_after', '{:.3f}')}, reward "
         f"{f('ppo.reward_before', '{:+.2f}')} -> {f('ppo.reward_after', '{:+.2f}')}, polite answers "
         f"{f('ppo.polite_before', '{:.0%}')} -> {f('ppo.polite_after', '{:.0%}')}, correct "
         f"{f('ppo.correct_before', '{:.0%}')} -> {f('ppo.correct_after', '{:.0%}')}, KL "
         f"{f('ppo.kl', '{:.2f}')} nats; DPO: judged {f('dpo.judge_after', '{:.3f}')}, polite "
         f"{f('dpo.polite_after', '{:.0%}')}, KL {f('dpo.kl', '{:.2f}')}"),
        ("task fine-tuning", "specialise in a domain", "chemistry conversations",
         f"domain {f('finetune.domain_accuracy_before')} -> {f('finetune.domain_accuracy_after')} "
         f"training {f('finetune.trainable_fraction', '{:.2%}')} of the weights (LoRA); general "
         f"{f('finetune.general_accuracy_before')} -> {f('finetune.general_accuracy_after')}"),
    ]
    kernels = ", ".join(f"{k} {v}" for k, v in flat["kernels"].items())
    seconds = ", ".join(f"{s} {flat[s + '.seconds']:.0f} s" for s in STAGES if s + ".seconds" in flat) or "-"
    how = (f"The mean of seeds {', '.join(map(str, seeds))}, [min..max] over them." if spread else
           f"(±x): half of how far each figure moved over seeds {', '.join(map(str, known['seeds']))} of the"
           f" default run ({os.path.relpath(SPREAD, HERE)})." if known else
           f"The spread over seeds in {os.path.relpath(SPREAD, HERE)} is not quoted: it is not of this run's data"
           " files and settings (`--seeds 0,1,2` measures theirs)." if other else "")
    md = [f"# Report card\n\nRun folder `{a.out}`, {wall:.0f} s wall time{' per seed, on average' if spread else ''}"
          f" ({seconds}).\nKernels: {kernels}.\n{how}\n",
          "| stage | purpose | data | measured proof |", "|---|---|---|---|"]
    md += [f"| {' | '.join(r)} |" for r in rows]
    if met:
        md.append(f"\n## Targets (README's, for the default run{': met by the mean' if spread else ''})\n")
        md += [f"- {stage}: {target}: **{'met' if ok else 'missed'}**" for stage, target, ok in met]
    for stage, m in report.items():
        if m.get("samples"):
            md.append(f"\n## {stage}: answers before and after{f' (seed {seeds[0]})' if seeds else ''}\n")
            for s in m["samples"]:
                note = f" ({s['note']})" if s.get("note") else ""
                md.append(f"- **{s['prompt']}**{note}\n  - before: `{s['before']}`\n  - after: `{s['after']}`")
    curves = write_curves(a, report)
    if curves:
        md.append(f"\n## Loss curves{f' (seed {seeds[0]})' if seeds else ''}\n")
        md += [f"![{c}]({c})" for c in curves]
    llm.atomic_write(os.path.join(a.out, "report.md"), ("\n".join(md) + "\n").encode())
    print("\n" + "\n".join(md[:len(rows) + 3]))
    print(f"\nreport: {os.path.join(a.out, 'report.md')}, {os.path.join(a.out, 'report.json')}")
    return flat


def write_curves(a, report):
    """Each stage's training curve as an SVG file (no plotting dependency)."""
    names = []
    for stage, m in report.items():
        h = m.get("history")
        if not h:
            continue
        if stage == "ppo":
            series = {"reward": [(r["iter"], r["reward"]) for r in h], "KL": [(r["iter"], r["kl"]) for r in h]}
        else:
            series = {"train loss": [(s, l) for s, l, _ in h],
                      "val loss": [(s, v) for s, _, v in h if v is not None]}
        name = f"{stage}_curve.svg"
        svg_line_chart(series, os.path.join(a.out, name), stage, "step", "value")
        names.append(name)
    return names


# SVG pictures, written by hand (no plotting library)

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _xml(s) -> str:
    """Text safe inside an SVG element or attribute."""
    return html.escape(_NOT_XML.sub("\ufffd", str(s)), quote=True)


def _nice_ticks(lo, hi, n=5):
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks = [start]
    while ticks[-1] < hi - 1e-9 * step:
        ticks.append(start + len(ticks) * step)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return ticks, decimals


def _write_svg(path, width, height, body):
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
           f'<rect width="{width}" height="{height}" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")
    llm.atomic_write(path, svg.encode("utf-8"))
    return path


def svg_line_chart(series, path, title, xlabel, ylabel):
    """A line chart as an SVG file: series maps a name to [(x, y), ...]
    (points with y None or not finite are skipped, e.g. steps without a
    validation loss), drawn with axes, round-numbered ticks and a legend."""
    clean = {}
    for name, pts in series.items():
        clean[name] = [(float(x), float(y)) for x, y in pts
                       if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    xs = [x for p in clean.values() for x, _ in p] or [0.0, 1.0]
    ys = [y for p in clean.values() for _, y in p] or [0.0, 1.0]
    xt, xd = _nice_ticks(min(xs), max(xs))
    yt, yd = _nice_ticks(min(ys), max(ys))
    W, H, left, right, top, bottom = 720, 420, 70, 170, 40, 55
    pw, ph = W - left - right, H - top - bottom

    def px(x):
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def py(y):
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    body = [f'<text x="{left + pw / 2}" y="24" text-anchor="middle" font-size="15">{_xml(title)}</text>']
    for v in xt:
        body.append(f'<line x1="{px(v):.1f}" y1="{top}" x2="{px(v):.1f}" y2="{top + ph}" stroke="#eee"/>')
        body.append(f'<text x="{px(v):.1f}" y="{top + ph + 16}" text-anchor="middle">{v:.{xd}f}</text>')
    for v in yt:
        body.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{left + pw}" y2="{py(v):.1f}" stroke="#eee"/>')
        body.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.{yd}f}</text>')
    body.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    body.append(f'<text x="{left + pw / 2}" y="{H - 12}" text-anchor="middle">{_xml(xlabel)}</text>')
    body.append(f'<text x="18" y="{top + ph / 2}" text-anchor="middle" '
                f'transform="rotate(-90 18 {top + ph / 2})">{_xml(ylabel)}</text>')
    for k, (name, pts) in enumerate(clean.items()):
        color = COLORS[k % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        if len(pts) > 1:
            body.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if len(pts) <= 40:
            body += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        ly = top + 10 + 20 * k
        body.append(f'<line x1="{left + pw + 12}" y1="{ly}" x2="{left + pw + 36}" y2="{ly}" '
                    f'stroke="{color}" stroke-width="3"/>')
        body.append(f'<text x="{left + pw + 42}" y="{ly + 4}">{_xml(name)}</text>')
    if not any(clean.values()):
        body.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" fill="#888">'
                    'no data</text>')
    return _write_svg(path, W, H, body)


def svg_heatmap(matrix, row_labels, col_labels, path, title):
    """A heatmap as an SVG file: one cell per matrix entry, white (the
    smallest of 0 and the minimum) to dark blue (the maximum), rows and
    columns labelled, a colour scale, and each cell's value as a tooltip."""
    m = numpy.asarray(matrix, dtype=numpy.float64)
    if m.ndim != 2 or m.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix: expected shape ({len(row_labels)}, {len(col_labels)}) to match"
                         f" the labels, got {m.shape}")
    finite = m[numpy.isfinite(m)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    hi = hi if hi > lo else lo + 1.0
    R, C = m.shape
    cell = max(6, min(26, 640 // max(R, C, 1)))
    rows = [str(s)[:24] for s in row_labels]
    cols = [str(s)[:24] for s in col_labels]
    left = 16 + 7 * max([len(s) for s in rows] + [1])
    top = 50 + int(6 * max([len(s) for s in cols] + [1]))
    W = max(left + C * cell + 110, 24 + int(7.5 * len(str(title))))
    H = max(top + R * cell + 30, top + 200)
    body = [f'<text x="12" y="24" font-size="15">{_xml(title)}</text>']

    def color(v):
        f = 0.0 if not math.isfinite(v) else (v - lo) / (hi - lo)
        r, g, b = (round(255 + f * (c - 255)) for c in (8, 48, 107))
        return f"rgb({r},{g},{b})"

    for i in range(R):
        y = top + i * cell
        body.append(f'<text x="{left - 6}" y="{y + cell / 2 + 4:.1f}" text-anchor="end">{_xml(rows[i])}</text>')
        for j in range(C):
            body.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" '
                        f'fill="{color(m[i, j])}" stroke="#f4f4f4"><title>{_xml(rows[i])} -&gt; '
                        f'{_xml(cols[j])}: {m[i, j]:.4f}</title></rect>')
    for j in range(C):
        x = left + j * cell + cell / 2 + 4
        body.append(f'<text x="{x:.1f}" y="{top - 6}" transform="rotate(-60 {x:.1f} {top - 6})">'
                    f'{_xml(cols[j])}</text>')
    bx = left + C * cell + 30
    body.append('<defs><linearGradient id="scale" x1="0" y1="1" x2="0" y2="0">'
                f'<stop offset="0" stop-color="{color(lo)}"/><stop offset="1" stop-color="{color(hi)}"/>'
                '</linearGradient></defs>')
    body.append(f'<rect x="{bx}" y="{top}" width="16" height="160" fill="url(#scale)" stroke="#333"/>')
    body.append(f'<text x="{bx + 22}" y="{top + 10}">{hi:.3g}</text>')
    body.append(f'<text x="{bx + 22}" y="{top + 160}">{lo:.3g}</text>')
    return _write_svg(path, W, H, body)


# ---- the command line -------------------------------------------------------

def training_flags(sizes):
    """Every flag of the stages: (group, flag, argparse settings, the stages
    it is for). `python train.py STAGE --help` shows that stage's own."""
    t, later = llm.TrainConfig(), ("sft", "reward", "ppo", "dpo", "finetune")
    return [
        ("run", "--out", dict(default=DEFAULT_OUT, help="the run folder"), STAGES),
        ("run", "--seed", dict(type=int, default=1337), STAGES),
        ("run", "--device", dict(choices=("cpu", "cuda"), default="cpu",
                                 help="cuda: every array on the GPU (needs CuPy; kernels: build_ext.py --cuda)"), STAGES),
        ("run", "--quick", dict(action="store_true", help="a small complete run (seconds)"), STAGES),
        ("run", "--seeds", dict(type=seed_list, help="e.g. 0,1,2: the run once per seed, and a report card of"
                                                    " their mean and spread"), ()),
        ("run", "--eval-limit", dict(type=int, default=sizes["eval_limit"],
                                     help="evaluate on at most this many held-out examples"), later),
        *[("model (nanoGPT's names)", "--" + k.replace("_", "-"), dict(type=int, default=sizes[k]), ("pretrain",))
          for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")],
        ("model (nanoGPT's names)", "--dropout", dict(type=float, default=0.0), ("pretrain",)),
        ("data", "--data", dict(help="a UTF-8 text file (default: data/corpus.txt); later stages replay it"),
         ("pretrain", "sft", "finetune")),
        ("data", "--sft-data", dict(help="instruction conversations (JSON lines, see data/world.py)"),
         ("sft", "finetune")),
        ("data", "--preferences-data", dict(help="preference pairs (JSON lines)"), ("reward", "ppo", "dpo")),
        ("data", "--domain-data", dict(help="domain conversations for fine-tuning (JSON lines)"), ("finetune",)),
        ("pretraining (nanoGPT's names)", "--resume", dict(
            action="store_true", help="continue the run folder's pretraining where it stopped (and keep the"
                                      " stages, or with --seeds the seeds, already done)"), ("pretrain",)),
        *[("pretraining (nanoGPT's names)", "--" + k.replace("_", "-"), dict(type=int, default=getattr(t, k)),
           ("pretrain",)) for k in ("warmup_iters", "eval_interval", "eval_iters", "grad_accum")],
        ("pretraining (nanoGPT's names)", "--batch-size", dict(type=int, default=sizes["batch_size"],
                                                               help="also instruction and fine-tuning's"),
         ("pretrain", "sft", "finetune")),
        ("pretraining (nanoGPT's names)", "--max-iters", dict(type=int, default=sizes["pretrain_iters"]),
         ("pretrain",)),
        ("pretraining (nanoGPT's names)", "--learning-rate", dict(type=float, default=sizes["learning_rate"]),
         ("pretrain",)),
        ("pretraining (nanoGPT's names)", "--min-lr", dict(type=float, help="default: learning rate / 10"),
         ("pretrain",)),
        *[("pretraining (nanoGPT's names)", "--" + k.replace("_", "-"), dict(type=float, default=getattr(t, k)),
           ("pretrain",)) for k in ("beta2", "weight_decay", "grad_clip")],
        *[(f"{s} stage", f"--{s}-{k}", kw, (s,)) for s, lr in (("sft", 1e-3), ("reward", 3e-4), ("dpo", 3e-5),
                                                                 ("finetune", 3e-3))
          for k, kw in (("iters", dict(type=int, default=sizes[f"{s}_iters"])), ("lr", dict(type=float, default=lr)))],
        ("reward stage", "--reward-lora", dict(type=int, default=0, help="train the reward model as LoRA"
                                               " adapters of this rank (0: every weight)"), ("reward",)),
        ("sft stage", "--replay", dict(type=float, default=0.5,
                                       help="the share of each instruction-tuning batch that is pretraining text"),
         ("sft",)),
        ("ppo stage", "--ppo-iters", dict(type=int, default=sizes["ppo_iters"]), ("ppo",)),
        ("ppo stage", "--ppo-lr", dict(type=float, default=llm.PPOConfig.learning_rate), ("ppo",)),
        ("ppo stage", "--kl-coef", dict(type=float, default=llm.PPOConfig.kl_coef), ("ppo",)),
        ("ppo stage", "--ptx-coef", dict(type=float, default=llm.PPOConfig.ptx_coef,
                                         help="weight of the pretraining loss in PPO's updates (PPO-ptx; 0: none)"), ("ppo",)),
        ("ppo stage", "--target-kl", dict(type=float, default=llm.PPOConfig.target_kl,
                                         help="adapt kl-coef toward this KL per answer (0: keep kl-coef fixed)"), ("ppo",)),
        ("dpo stage", "--dpo-beta", dict(type=float, default=0.5, help="how hard the reference holds the policy"
                                         " back (DPO's beta; 0.5 broke fewer right answers here than 0.1)"), ("dpo",)),
        ("finetune stage", "--finetune-replay", dict(
            type=float, default=0.0, help="the share of each fine-tuning batch that is pretraining text (0: only "
                                          "the general conversations mixed in; 0.25 costs ~12 points of general "
                                          "accuracy)"), ("finetune",)),
        ("finetune stage", "--full", dict(action="store_true", help="fine-tune every weight instead of LoRA"),
         ("finetune",)),
        ("finetune stage", "--lora-r", dict(type=int, default=4), ("finetune",)),
        ("finetune stage", "--lora-alpha", dict(type=float, default=16.0), ("finetune",)),
        ("finetune stage", "--lora-dropout", dict(type=float, default=0.0), ("finetune",)),
        ("finetune stage", "--lora-targets", dict(default=",".join(LORA_TARGETS), help="the linear layers that"
                                                  " get adapters (a name's end, e.g. c_proj, picks both)"),
         ("finetune",)),
    ]


def seed_list(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0 like 0,1,2, got {text!r}")
    return seeds


def add_flags(p, sizes, stage):
    """A stage's flags (every stage's for "all"); the others keep their defaults."""
    groups = {}
    for group, flag, kw, stages in training_flags(sizes):
        if stage == "all" or stage in stages:
            if group not in groups:
                groups[group] = p.add_argument_group(group)
            groups[group].add_argument(flag, **kw)
        else:
            default = False if kw.get("action") == "store_true" else kw.get("default")
            p.set_defaults(**{flag[2:].replace("-", "_"): default})


# What each number must be: (flags, the test, what is expected).
RANGES = [
    (("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "eval_interval", "eval_iters",
      "grad_accum", "sft_iters", "reward_iters", "dpo_iters", "finetune_iters", "ppo_iters", "lora_r",
      "eval_limit", "top"), lambda v: v >= 1, "an integer >= 1"),
    (("warmup_iters", "seed", "reward_lora"), lambda v: v >= 0, "an integer >= 0"),
    (("vocab_size",), lambda v: v >= 256 + len(llm.SPECIAL_TOKENS),
     f"at least {256 + len(llm.SPECIAL_TOKENS)} (256 bytes + {len(llm.SPECIAL_TOKENS)} special tokens)"),
    (("learning_rate", "sft_lr", "reward_lr", "dpo_lr", "finetune_lr", "ppo_lr", "lora_alpha", "dpo_beta"),
     lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    (("min_lr", "weight_decay", "grad_clip", "kl_coef", "target_kl", "ptx_coef"), lambda v: math.isfinite(v) and v >= 0,
     "a number >= 0"),
    (("dropout", "lora_dropout", "beta2"), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    (("replay", "finetune_replay"), lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
]


def check_ranges(a, names, source=""):
    """The flags `names` in their RANGES: a mistake is one line naming the flag (and where its value came from)."""
    for flags, ok, what in RANGES:
        for name in flags:
            v = getattr(a, name, None)
            if name in names and v is not None and not ok(v):
                raise UserError(f"--{name.replace('_', '-')}: expected {what}, got {v!r}{source}")


def check_args(a):
    """Every flag in its range, and a run folder that can be written: a
    mistake is one line naming the flag, before anything runs."""
    check_ranges(a, vars(a))
    if getattr(a, "n_embd", None) and a.n_embd % a.n_head:
        raise UserError(f"--n-embd: expected a multiple of --n-head {a.n_head}, got {a.n_embd}")
    if getattr(a, "seeds", None) and "seed" in a.given:
        raise UserError("--seed: --seeds runs each of its seeds in turn: give one or the other")
    targets = getattr(a, "lora_targets", None)
    if targets is not None and not all(any(("." + n).endswith("." + t) for n in LORA_TARGETS)
                                       for t in targets.split(",")):
        raise UserError(f"--lora-targets: expected linear layers from {','.join(LORA_TARGETS)}, got {targets!r}")
    if getattr(a, "min_lr", None) is not None and a.min_lr > a.learning_rate:     # (the decay would raise it)
        raise UserError(f"--min-lr: expected at most --learning-rate {a.learning_rate:g}, got {a.min_lr:g}")
    if not hasattr(a, "explain") and llm.world.rank == 0:     # (rank 0 alone writes)
        if os.path.exists(a.out) and not os.path.isdir(a.out):
            raise UserError(f"--out: expected a folder, got the file {a.out}")
        try:
            os.makedirs(a.out, exist_ok=True)
            llm.atomic_write(os.path.join(a.out, ".writable"), b"")
            os.remove(os.path.join(a.out, ".writable"))
        except OSError as e:
            raise UserError(f"--out: cannot write to the folder {a.out} ({e.strerror or e})") from None


def add_source_flags(p, what):
    g = p.add_argument_group("which model (" + what + ")")
    g.add_argument("--out", help=f"the run folder (default: {DEFAULT_OUT})")
    g.add_argument("--ckpt", help="a checkpoint file (overrides --out and --stage)")
    g.add_argument("--stage", choices=MODEL_STAGES, help="the run folder's checkpoint of this stage")
    g.add_argument("--gpt2", metavar="DIR",
                   help="GPT-2 in Hugging Face's layout: DIR/model.safetensors and a .tiktoken file")


def add_sampling_flags(p, temperature=1.0, max_tokens=100):
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"<1 sharpens, >1 flattens, 0 always takes the likeliest token (default {temperature})")
    g.add_argument("--top-k", type=int, help="sample among the k likeliest tokens only")
    g.add_argument("--top-p", type=float, help="sample among the likeliest tokens whose probabilities reach p")
    g.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"at most this many new tokens"
                   f" (default {max_tokens})")


def add_explain_commands(sub):
    """The subcommands that look inside a model; each sets its handler as `explain`."""
    sp = sub.add_parser("tokens", help="how the tokenizer cuts text into tokens")
    sp.add_argument("--text", default="The cat sat on the mat.", help="the text to tokenize")
    sp.add_argument("--special", action="store_true", help="read <|endoftext|> etc. as special tokens")
    add_source_flags(sp, "whose tokenizer")
    sp.set_defaults(explain=cmd_tokens)
    sp = sub.add_parser("sample", help="the next-token probabilities, then a streamed continuation")
    sp.add_argument("--prompt", default="The", help="the text to continue")
    sp.add_argument("--top", type=int, default=10, help="rows of the probability table")
    add_source_flags(sp, "default: the run folder's pretrain.safetensors")
    add_sampling_flags(sp)
    sp.set_defaults(explain=cmd_sample)
    sp = sub.add_parser("attention", help="which earlier tokens each token attends to (+ an SVG heatmap)")
    sp.add_argument("--text", default="The cat sat on the mat because it was soft.")
    sp.add_argument("--layer", default="average", help="a layer number (negative: from the end) or 'average'")
    sp.add_argument("--head", default="average", help="a head number or 'average'")
    sp.add_argument("--svg", help="where to write the heatmap (default: the run folder)")
    add_source_flags(sp, "default: the run folder's pretrain.safetensors")
    sp.set_defaults(explain=cmd_attention)
    sp = sub.add_parser("chat", help="talk to the instruction-tuned model")
    add_source_flags(sp, "default: the run folder's sft.safetensors")
    add_sampling_flags(sp, temperature=0.8, max_tokens=200)
    sp.set_defaults(explain=cmd_chat)


class Parser(argparse.ArgumentParser):
    def error(self, message):                      # argparse's own errors: one line too
        raise UserError(f"{message} (`{self.prog} --help` lists the flags)")


def parse(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    sizes = QUICK if "--quick" in argv else FULL
    p = Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", parser_class=Parser)
    for name in ("all",) + STAGES:
        add_flags(sub.add_parser(name, help="every stage" if name == "all" else f"the {name} stage",
                                 allow_abbrev=False), sizes, name)
    add_explain_commands(sub)
    typed = argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["all"] + argv
    a = p.parse_args(argv)
    a.argv = typed                                  # for the command that resumes it
    a.given = {t.split("=")[0][2:].replace("-", "_") for t in argv if t.startswith("--")}   # typed, not defaults
    return a


def main(argv=None):
    """Run the command; a user's mistake is one line (LLM_DEBUG=1 shows the traceback)."""
    return command(argv) if llm.world.size == 1 else on_every_rank(argv)


def command(argv):
    try:
        a = parse(argv)
        check_args(a)
        same_on_every_rank(a)
        try:
            llm.use_device(getattr(a, "device", "cpu"))   # before any model is built
        except RuntimeError as e:
            raise UserError(f"--device: {e}") from None
        if llm.xp is numpy and getattr(a, "explain", None) is not cmd_tokens:
            llm.kernel_choice(say=print)    # a build's first use times its kernels: said, and before any clock starts
        if hasattr(a, "explain"):
            return a.explain(a)
        return run_seeds(a) if getattr(a, "seeds", None) else run(a)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print(f"\ntrain.py: interrupted{RUNNING and '. ' + resume_hint(*RUNNING)}", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError, FloatingPointError, MemoryError) as e:
        if os.environ.get("LLM_DEBUG") == "1":
            raise
        if isinstance(e, MemoryError):                      # (its message may be empty)
            e = (f"out of memory{f' ({e})' if str(e) else ''}: a smaller --n-layer, --n-embd, --batch-size"
                 " or --block-size needs less")
        print(f"train.py: error: {e} (LLM_DEBUG=1 shows where)", file=sys.stderr)
        raise SystemExit(2) from None


def run_seeds(a):
    """--seeds 0,1,2: the whole run once per seed (in OUT/seed-S), then one
    report card of their mean, each figure with its min..max, and the spread
    (OUT/seed_spread.json; copied to data/, it is what single runs' cards quote).
    With --resume a seed whose folder has its report card is not run again."""
    flats, reports = [], {}
    for seed in a.seeds:
        b = copy.copy(a)
        b.seed, b.seeds, b.out = seed, None, os.path.join(a.out, f"seed-{seed}")
        check_args(b)
        if not (a.resume and os.path.exists(os.path.join(b.out, "report.json"))):   # --resume keeps a seed done
            run(b)
        llm.world.barrier()                       # several ranks: rank 0 has written it
        full = read_json(os.path.join(b.out, "report.json"), ("stages", *(flats[0] if flats else ("wall_seconds",))))
        reports[f"seed {seed}"] = full.pop("stages")
        flats.append(full)
    numbers = [k for k, v in flats[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mean = {**flats[0], **{k: sum(f[k] for f in flats) / len(flats) for k in numbers}}
    spread = {k: (min(f[k] for f in flats), max(f[k] for f in flats)) for k in numbers}
    llm.atomic_write(os.path.join(a.out, "seed_spread.json"),
                     json.dumps({"seeds": a.seeds, "spread": spread, "recipe": recipe(a)}, indent=1).encode())
    first = {stage: {k: v for k, v in m.items() if k in ("samples", "history")}      # the first seed's answers
             for stage, m in next(iter(reports.values())).items()}                 # and curves, not its figures
    write_report_card(a, first, mean["wall_seconds"], mean, spread, a.seeds)


# ---- several processes: mpirun -n N python train.py -----------------------------
# Every rank runs the same command (llm.py's section 10 says how they train
# together); rank 0 alone prints and writes the run folder.

def same_on_every_rank(a):
    """Under mpirun every rank must run the same command on the same code and
    data: the first difference is an error, said by rank 0, before anything runs."""
    if llm.world.size == 1:
        return
    if hasattr(a, "explain"):
        raise UserError(f"{a.cmd} runs in one process: start it without mpirun")
    values = {f"--{k.replace('_', '-')}": v for k, v in sorted(vars(a).items()) if k not in ("given", "argv")}
    paths = [os.path.join(HERE, f) for f in ("llm.py", "train.py", "fastops.c", os.path.join("data", "world.py"))]
    paths += data_paths(a).values()
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            values[path] = f"{len(data):,} bytes (sha256 {hashlib.sha256(data).hexdigest()[:12]})"
        except OSError as e:
            values[path] = f"unreadable ({e.strerror or e})"
    try:
        llm.world.agree(**values)
    except llm.RanksDiffer as e:
        raise UserError(str(e)) from None


def on_every_rank(argv):
    """main() on one of several ranks. An error on any rank stops them all
    (MPI_Abort) with its message; one that every rank meets alike (the ranks
    differ) is said once, by rank 0, and every rank exits with status 2."""
    w, stderr = llm.world, sys.stderr
    if w.rank:
        sys.stdout, sys.stderr = open(os.devnull, "w"), io.StringIO()
    try:
        return command(argv)
    except SystemExit as e:
        if e.code in (0, None) or isinstance(e.__context__, llm.RanksDiffer):
            raise
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    if w.rank:
        time.sleep(2)                                   # rank 0, if it fails too, says it first
        stderr.write("".join(f"[rank {w.rank}] {line}\n" for line in sys.stderr.getvalue().splitlines()))
    w.fail(code=code)


RUNNING = None                          # (args, stage) while a stage runs


def resume_hint(a, stage) -> str:
    """What an interrupted stage left, and the command that carries on: the
    same one (under mpirun, as many ranks), with --resume where it has that flag."""
    ckpt = os.path.join(a.out, "pretrain.safetensors")
    resume = a.cmd in ("all", "pretrain") and "--resume" not in a.argv
    mpirun = f"mpirun -n {llm.world.size} " if llm.world.size > 1 else ""
    cmd = mpirun + "python train.py " + shlex.join(a.argv + ["--resume"] * resume)
    if stage == "pretrain" and os.path.exists(ckpt):
        return f"The last checkpoint is {ckpt}: `{cmd}` continues from it."
    return (f"The {stage} stage had not finished, the earlier stages' files are kept:"
            f" `{cmd}` runs it{' and the rest' if a.cmd == 'all' else ''} again.")


def run(a):
    """The stages, then the report card of every stage in the run folder.
    With --resume a stage already done (its results and checkpoint are in
    the run folder) is not run again."""
    global RUNNING
    t0 = time.time()
    for s in STAGES if a.cmd == "all" else (a.cmd,):
        done = os.path.join(a.out, f"{s}.json")
        if a.resume and s != "pretrain" and os.path.exists(done) and os.path.exists(done[:-5] + ".safetensors"):
            print(f"[{s}] done already ({done}): --resume keeps it")
            continue
        t, RUNNING = time.time(), (a, s)
        m = RUNNERS[s](a)
        RUNNING = None
        if m is None:                    # pretraining stopped before its end
            return
        m.setdefault("seconds", time.time() - t)       # (pretraining resumed when finished keeps its own)
        llm.atomic_write(done, json.dumps(m, indent=2).encode())
    if llm.world.rank:                   # rank 0 writes the report card
        return
    # The report card covers every stage whose results are in the run folder.
    report = {}
    for s in STAGES:
        path = os.path.join(a.out, f"{s}.json")
        if os.path.exists(path):
            report[s] = read_json(path, FIGURES[s] + ("seconds",))
    wall = time.time() - t0 if a.cmd == "all" else sum(m["seconds"] for m in report.values())
    write_report_card(a, report, wall)


if __name__ == "__main__":
    main()
