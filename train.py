"""The command line of llm: the four training stages, on the embedded data.

    python train.py               every stage in order, then the report card
    python train.py --quick       the same, small: a complete run in about a minute
    python train.py pretrain      one stage alone: pretrain, sft, reward, ppo, dpo,
                                  finetune (each reads the previous stage's checkpoint
                                  from the run folder --out and writes its own)

`python train.py STAGE --help` lists a stage's flags.
"""
import argparse
import copy
import json
import os
import sys
import time

import llm

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "finetune")

# Sized so that all stages take about 10 minutes on a 2-core laptop CPU;
# --quick shrinks every stage for a complete run in about a minute.
FULL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=512,
            pretrain_iters=2000, sft_iters=600, reward_iters=300, ppo_iters=30,
            dpo_iters=200, finetune_iters=300, eval_limit=None)
QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=300,
             pretrain_iters=150, sft_iters=60, reward_iters=40, ppo_iters=3,
             dpo_iters=20, finetune_iters=40, eval_limit=24)


# ---- the run folder -----------------------------------------------------------

def ckpt_path(a, stage):
    return os.path.join(a.out, f"{stage}.safetensors")


def load_stage(a, *stages):
    """The first of `stages` whose checkpoint is in the run folder."""
    for s in stages:
        if os.path.exists(ckpt_path(a, s)):
            model, tok, _, info = llm.load_checkpoint(ckpt_path(a, s))
            return model, tok, s
    sys.exit(f"{a.out}: no {' or '.join(s + '.safetensors' for s in stages)}; "
             f"run `python train.py {stages[-1]} --out {a.out}` first")


def read_data(a, name, fields):
    path = getattr(a, name + "_data", None) or os.path.join(DATA, name + ".jsonl")
    records = llm.read_jsonl(path, fields)
    train = [r for r in records if r.get("split", "train") == "train"]
    test = [r for r in records if r.get("split") == "test"]
    if a.eval_limit:
        test = test[:a.eval_limit]
    return train, test


def world():
    """The judge of the embedded data (data/world.py)."""
    from data import world as w
    return w


def train_config(a, iters, lr, batch_size=None, warmup=None):
    return llm.TrainConfig(batch_size=batch_size or a.batch_size, max_iters=iters, learning_rate=lr,
                           min_lr=lr / 10, warmup_iters=warmup if warmup is not None else max(1, iters // 20),
                           beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=max(1, iters // 4),
                           eval_iters=10, seed=a.seed)


def answers(model, tok, prompts, **kw):
    out = [llm.answer(model, tok, p, **kw) for p in prompts]
    return [t for t, _ in out], [e for _, e in out]


def accuracy(model, tok, records, check):
    texts, _ = answers(model, tok, [r["prompt"] for r in records])
    return sum(check(r, t) for r, t in zip(records, texts)) / max(len(records), 1), texts


def show_samples(title, prompts, before, after):
    print(f"  {title}")
    for p, b, c in list(zip(prompts, before, after))[:3]:
        print(f"    Q: {p}\n      before: {b!r}\n      after:  {c!r}")
    return [{"prompt": p, "before": b, "after": c} for p, b, c in list(zip(prompts, before, after))[:5]]


def stage_log(name):
    """A progress line for the stages that use train_steps."""
    return llm.Progress(name)


# ---- the stages -------------------------------------------------------------

def run_pretrain(a):
    path = a.data or os.path.join(DATA, "corpus.txt")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"--data: cannot read {path}: {e}")
    cfg = llm.GPTConfig(a.n_layer, a.n_head, a.n_embd, a.block_size, a.vocab_size, dropout=a.dropout)
    tc = llm.TrainConfig(**{k: getattr(a, k) for k in vars(llm.TrainConfig())})
    print(f"[pretrain] {path} ({len(text):,} characters); {a.n_layer} layers x {a.n_embd} wide, "
          f"{a.n_head} heads, context {a.block_size}, vocabulary {a.vocab_size}")
    progress = llm.Progress("pretrain")
    m = llm.pretrain(text, a.out, cfg, tc, resume=a.resume, log=progress,
                     on_ready=lambda bpt: setattr(progress, "bpt", bpt))
    if not m:
        return None
    model, tok, state, _ = llm.load_checkpoint(ckpt_path(a, "pretrain"))
    prompt = "The capital of France is"
    logits, _ = model.forward([tok.encode(prompt)])
    probs = llm.next_token_probs(logits[0, -1])
    top = [(tok.decode([int(i)]), float(probs[i])) for i in llm.xp.argsort(-probs)[:5]]
    paris = tok.encode(" Paris")
    m.update(prompt=prompt, top5=top, paris_prob=float(probs[paris[0]]),
             paris_is_top=top[0][0] == tok.decode(paris[:1]), history=state.history)
    print(f"  after pretraining, {prompt!r} continues with:")
    for t, p in top:
        print(f"    {t!r:>14} {p:6.1%}")
    print(f"  val loss {m['val_loss']:.3f}, {m['bits_per_byte']:.3f} bits per byte, "
          f"{m['steps']} steps, {m['tokens_per_second']:,.0f} tokens/s")
    return m


def run_sft(a):
    model, tok, _ = load_stage(a, "pretrain")
    train, test = read_data(a, "sft", ("prompt", "response"))
    exact = lambda r, t: world().exact_match(r["response"], t)
    before, texts0 = accuracy(model, tok, test, exact)
    print(f"[sft] {len(train)} conversations; held-out exact-match accuracy before: {before:.1%}")
    tc = train_config(a, a.sft_iters, a.sft_lr)
    state = llm.TrainState()
    llm.train_steps(model, state, tc, llm.sft_batches(tok, train, tc.batch_size, model.config.block_size),
                    log=stage_log("sft"))
    after, texts1 = accuracy(model, tok, test, exact)
    print(f"  held-out exact-match accuracy: {before:.1%} -> {after:.1%} ({len(test)} questions)")
    llm.save_checkpoint(ckpt_path(a, "sft"), model, tok, stage="sft")
    return {"accuracy_before": before, "accuracy_after": after, "n_test": len(test),
            "steps": state.step, "history": state.history,
            "samples": show_samples("samples", [r["prompt"] for r in test], texts0, texts1)}


def run_reward(a):
    model, tok, _ = load_stage(a, "sft")
    train, test = read_data(a, "preferences", ("prompt", "chosen", "rejected"))
    llm.add_head(model, "score", llm.numpy.random.default_rng(a.seed))
    before = llm.reward_accuracy(model, tok, test)
    print(f"[reward] {len(train)} preference pairs; held-out accuracy before: {before:.1%}")
    tc = train_config(a, a.reward_iters, a.reward_lr, batch_size=16)
    T = model.config.block_size

    def batch_fn(rng):
        return llm.pair_batch(tok, [train[i] for i in rng.integers(0, len(train), tc.batch_size)], T)

    state = llm.TrainState()
    llm.train_steps(model, state, tc, batch_fn, llm.reward_loss, log=stage_log("reward"))
    acc = llm.reward_accuracy(model, tok, test)
    flaws = {}
    for f in sorted({r.get("flaw", "") for r in test}):
        flaws[f] = llm.reward_accuracy(model, tok, [r for r in test if r.get("flaw", "") == f])
    print(f"  held-out pair accuracy: {before:.1%} -> {acc:.1%}; by flaw: "
          + ", ".join(f"{k} {v:.0%}" for k, v in flaws.items()))
    llm.save_checkpoint(ckpt_path(a, "reward"), model, tok, stage="reward")
    return {"accuracy_before": before, "accuracy": acc, "by_flaw": flaws, "n_test": len(test),
            "history": state.history}


def judge_answers(model, tok, rm, prompts):
    """Greedy answers to held-out prompts -> judge score, reward, answers."""
    w = world()
    texts, ended = answers(model, tok, prompts)
    judged = [w.judge(p, t, e) for p, t, e in zip(prompts, texts, ended)]
    rewards = llm.score_answers(rm, tok, prompts, texts, ended)
    return sum(judged) / len(judged), sum(rewards) / len(rewards), texts


def policy_kl(policy, ref, tok, prompts, texts):
    """KL(policy || reference) on the policy's greedy answers to held-out
    prompts, in nats per answer."""
    ex = [llm.chat_example(tok, p, t) for p, t in zip(prompts, texts)]
    x, y, mask = llm.pad_batch(ex, tok.special[llm.END], policy.config.block_size)
    return float(llm.kl_to_reference(policy, ref, x, y, mask).mean())


def rlhf_eval_prompts(a):
    _, test = read_data(a, "preferences", ("prompt", "chosen", "rejected"))
    return sorted({r["prompt"] for r in test})


def run_ppo(a):
    policy, tok, _ = load_stage(a, "sft")
    ref = copy.deepcopy(policy)
    rm, _, _ = load_stage(a, "reward")
    train, _ = read_data(a, "preferences", ("prompt", "chosen", "rejected"))
    prompts = sorted({r["prompt"] for r in train})
    held = rlhf_eval_prompts(a)
    judge0, reward0, texts0 = judge_answers(policy, tok, rm, held)
    print(f"[ppo] {len(prompts)} training prompts; held-out judge {judge0:.3f}, reward {reward0:.3f}")
    pc = llm.PPOConfig(iters=a.ppo_iters, learning_rate=a.ppo_lr, kl_coef=a.kl_coef,
                       target_kl=a.target_kl, seed=a.seed)

    def log(row, elapsed):
        print(f"  ppo iter {row['iter']}/{pc.iters} reward {row['reward']:+.3f} kl {row['kl']:.3f} "
              f"clip {row['clip_frac']:.2f} value loss {row['vf_loss']:.4f} entropy {row['entropy']:.3f}"
              f" | {elapsed:.0f}s", flush=True)

    history = llm.ppo(policy, ref, rm, tok, prompts, pc, log=log)
    for k in ("value.weight", "value.bias"):
        policy.params.pop(k)
    judge1, reward1, texts1 = judge_answers(policy, tok, rm, held)
    kl = policy_kl(policy, ref, tok, held, texts1)
    print(f"  held-out judge {judge0:.3f} -> {judge1:.3f}, reward {reward0:.3f} -> {reward1:.3f}, "
          f"KL to the reference {kl:.3f} nats per answer")
    llm.save_checkpoint(ckpt_path(a, "ppo"), policy, tok, stage="ppo")
    return {"judge_before": judge0, "judge_after": judge1, "reward_before": reward0,
            "reward_after": reward1, "kl": kl, "n_test": len(held), "history": history,
            "samples": show_samples("samples", held, texts0, texts1)}


def run_dpo(a):
    policy, tok, _ = load_stage(a, "sft")
    ref = copy.deepcopy(policy)
    rm, _, _ = load_stage(a, "reward")
    train, _ = read_data(a, "preferences", ("prompt", "chosen", "rejected"))
    held = rlhf_eval_prompts(a)
    judge0, reward0, texts0 = judge_answers(policy, tok, rm, held)
    print(f"[dpo] {len(train)} preference pairs, beta {a.dpo_beta}; held-out judge {judge0:.3f}")
    tc = train_config(a, a.dpo_iters, a.dpo_lr, batch_size=8)
    T = policy.config.block_size

    def batch_fn(rng):
        return llm.pair_batch(tok, [train[i] for i in rng.integers(0, len(train), tc.batch_size)], T)

    state = llm.TrainState()
    llm.train_steps(policy, state, tc, batch_fn,
                    lambda m, b: llm.dpo_loss(m, ref, b, a.dpo_beta), log=stage_log("dpo"))
    judge1, reward1, texts1 = judge_answers(policy, tok, rm, held)
    kl = policy_kl(policy, ref, tok, held, texts1)
    print(f"  held-out judge {judge0:.3f} -> {judge1:.3f}, reward {reward0:.3f} -> {reward1:.3f}, "
          f"KL {kl:.3f}")
    llm.save_checkpoint(ckpt_path(a, "dpo"), policy, tok, stage="dpo")
    return {"judge_before": judge0, "judge_after": judge1, "reward_before": reward0,
            "reward_after": reward1, "kl": kl, "history": state.history,
            "samples": show_samples("samples", held, texts0, texts1)}


def run_finetune(a):
    model, tok, base = load_stage(a, "ppo", "sft")
    train, test = read_data(a, "domain", ("prompt", "response"))
    general_train, general = read_data(a, "sft", ("prompt", "response"))
    correct = lambda r, t: world().is_correct(r["prompt"], t)
    dom0, texts0 = accuracy(model, tok, test, correct)
    gen0, _ = accuracy(model, tok, general, correct)
    # A little general data mixed in keeps the old skill from being overwritten.
    rng = llm.numpy.random.default_rng(a.seed)
    replay = [general_train[i] for i in rng.choice(len(general_train), len(train) // 5, replace=False)]
    lora = None if a.full else dict(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                                     targets=tuple(a.lora_targets.split(",")))
    print(f"[finetune] base: {base}; {len(train)} domain conversations (+{len(replay)} general); "
          + ("all weights" if a.full else f"LoRA r={a.lora_r} alpha={a.lora_alpha} on {a.lora_targets}")
          + f"; held-out domain accuracy before {dom0:.1%}, general {gen0:.1%}")
    tc = train_config(a, a.finetune_iters, a.finetune_lr)
    state = llm.finetune(model, tok, train + replay, tc, lora, log=stage_log("finetune"))
    frac = llm.trainable_fraction(model)
    if model.lora:
        llm.save_lora(os.path.join(a.out, "finetune.lora.safetensors"), model)
        llm.merge_lora(model)
    dom1, texts1 = accuracy(model, tok, test, correct)
    gen1, _ = accuracy(model, tok, general, correct)
    print(f"  trained {frac:.2%} of the parameters; held-out domain accuracy {dom0:.1%} -> {dom1:.1%}, "
          f"general {gen0:.1%} -> {gen1:.1%}")
    model.lora, model.frozen = {}, set()
    for k in [k for k in model.params if ".lora_" in k]:
        model.params.pop(k)
    llm.save_checkpoint(ckpt_path(a, "finetune"), model, tok, stage="finetune", base=base)
    return {"domain_accuracy_before": dom0, "domain_accuracy_after": dom1, "trainable_fraction": frac,
            "general_accuracy_before": gen0, "general_accuracy_after": gen1, "base": base,
            "history": state.history,
            "samples": show_samples("samples", [r["prompt"] for r in test], texts0, texts1)}


RUNNERS = {"pretrain": run_pretrain, "sft": run_sft, "reward": run_reward, "ppo": run_ppo,
           "dpo": run_dpo, "finetune": run_finetune}


# ---- the report card --------------------------------------------------------

def flat_report(report, wall):
    """The headline numbers, under the names README and the tests use."""
    keys = {"pretrain": ("val_loss", "bits_per_byte", "paris_prob"),
            "sft": ("accuracy_before", "accuracy_after"), "reward": ("accuracy",),
            "ppo": ("judge_before", "judge_after", "reward_before", "reward_after", "kl"),
            "dpo": ("judge_after", "reward_after", "kl"),
            "finetune": ("domain_accuracy_before", "domain_accuracy_after", "trainable_fraction",
                         "general_accuracy_before", "general_accuracy_after")}
    flat = {f"{s}.{k}": report[s][k] for s, ks in keys.items() if s in report for k in ks}
    flat["wall_seconds"] = wall
    return flat


def write_report_card(a, report, wall):
    flat = flat_report(report, wall)
    full = {**flat, "stages": report}
    llm._atomic_write(os.path.join(a.out, "report.json"), json.dumps(full, indent=2).encode())
    f = lambda k, fmt="{:.1%}": fmt.format(flat[k]) if k in flat else "-"
    rows = [
        ("pretraining", "language and knowledge", "the embedded corpus",
         f"val loss {f('pretrain.val_loss', '{:.3f}')}, {f('pretrain.bits_per_byte', '{:.3f}')} bits/byte; "
         f"P(' Paris' | 'The capital of France is') = {f('pretrain.paris_prob')}"),
        ("instruction tuning", "follow instructions", "instruction-response conversations",
         f"held-out exact match {f('sft.accuracy_before')} -> {f('sft.accuracy_after')}"),
        ("RLHF", "align with preferences", "preference pairs",
         f"reward model {f('reward.accuracy')} on held-out pairs; PPO judge "
         f"{f('ppo.judge_before', '{:.3f}')} -> {f('ppo.judge_after', '{:.3f}')}, reward "
         f"{f('ppo.reward_before', '{:.2f}')} -> {f('ppo.reward_after', '{:.2f}')}, KL {f('ppo.kl', '{:.2f}')}; "
         f"DPO judge {f('dpo.judge_after', '{:.3f}')}"),
        ("task fine-tuning", "specialise in a domain", "chemistry conversations",
         f"domain {f('finetune.domain_accuracy_before')} -> {f('finetune.domain_accuracy_after')} "
         f"training {f('finetune.trainable_fraction', '{:.2%}')} of the weights (LoRA); general "
         f"{f('finetune.general_accuracy_before')} -> {f('finetune.general_accuracy_after')}"),
    ]
    md = [f"# Report card\n\nRun folder `{a.out}`, {wall:.0f} s wall time.\n",
          "| stage | purpose | data | measured proof |", "|---|---|---|---|"]
    md += [f"| {' | '.join(r)} |" for r in rows]
    for stage, m in report.items():
        if m.get("samples"):
            md.append(f"\n## {stage}: answers before and after\n")
            for s in m["samples"]:
                md.append(f"- **{s['prompt']}**\n  - before: `{s['before']}`\n  - after: `{s['after']}`")
    curves = write_curves(a, report)
    if curves:
        md.append("\n## Loss curves\n")
        md += [f"![{c}]({c})" for c in curves]
    llm._atomic_write(os.path.join(a.out, "report.md"), ("\n".join(md) + "\n").encode())
    print("\n" + "\n".join(md[:len(rows) + 3]))
    print(f"\nreport: {os.path.join(a.out, 'report.md')}, {os.path.join(a.out, 'report.json')}")
    return flat


def write_curves(a, report):
    """Each stage's training curve as an SVG file (no plotting dependency)."""
    chart = globals().get("svg_line_chart")
    if chart is None:
        return []
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
        chart(series, os.path.join(a.out, name), stage, "step", "value")
        names.append(name)
    return names


# ---- the command line -------------------------------------------------------

def add_flags(p, sizes):
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/default", help="the run folder")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--quick", action="store_true", help="a small complete run (about a minute)")
    g.add_argument("--eval-limit", type=int, default=sizes["eval_limit"],
                   help="evaluate on at most this many held-out examples")
    g = p.add_argument_group("model (nanoGPT's names)")
    for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        g.add_argument("--" + k.replace("_", "-"), type=int, default=sizes[k])
    g.add_argument("--dropout", type=float, default=0.0)
    g = p.add_argument_group("pretraining (nanoGPT's names)")
    t = llm.TrainConfig()
    g.add_argument("--data", help="a UTF-8 text file (default: data/corpus.txt)")
    g.add_argument("--resume", action="store_true", help="continue pretraining from the run folder")
    for k in ("batch_size", "warmup_iters", "eval_interval", "eval_iters", "grad_accum"):
        g.add_argument("--" + k.replace("_", "-"), type=int, default=getattr(t, k))
    g.add_argument("--max-iters", type=int, default=sizes["pretrain_iters"])
    for k in ("learning_rate", "min_lr", "beta2", "weight_decay", "grad_clip"):
        g.add_argument("--" + k.replace("_", "-"), type=float, default=getattr(t, k))
    g = p.add_argument_group("later stages")
    for s, lr in (("sft", 1e-3), ("reward", 3e-4), ("dpo", 1e-4), ("finetune", 3e-3)):
        g.add_argument(f"--{s}-iters", type=int, default=sizes[f"{s}_iters"])
        g.add_argument(f"--{s}-lr", type=float, default=lr)
    g.add_argument("--sft-data", help="instruction conversations (JSON lines, see data/world.py)")
    g.add_argument("--preferences-data", help="preference pairs (JSON lines)")
    g.add_argument("--domain-data", help="domain conversations for fine-tuning (JSON lines)")
    g.add_argument("--ppo-iters", type=int, default=sizes["ppo_iters"])
    g.add_argument("--ppo-lr", type=float, default=2e-5)
    g.add_argument("--kl-coef", type=float, default=0.05)
    g.add_argument("--target-kl", type=float, default=None, help="adapt kl-coef toward this KL")
    g.add_argument("--dpo-beta", type=float, default=0.1)
    g.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj")


def parse(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    sizes = QUICK if "--quick" in argv else FULL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    for name in ("all",) + STAGES:
        add_flags(sub.add_parser(name, help="every stage" if name == "all" else f"the {name} stage"), sizes)
    if not argv or argv[0].startswith("-"):
        argv = ["all"] + argv
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    for s in STAGES if a.cmd == "all" else (a.cmd,):
        t = time.time()
        m = RUNNERS[s](a)
        if m is None:                    # pretraining stopped before its end
            return
        m["seconds"] = time.time() - t
        llm._atomic_write(os.path.join(a.out, f"{s}.json"), json.dumps(m, indent=2).encode())
    # The report card covers every stage whose results are in the run folder.
    report = {}
    for s in STAGES:
        path = os.path.join(a.out, f"{s}.json")
        if os.path.exists(path):
            with open(path) as f:
                report[s] = json.load(f)
    wall = time.time() - t0 if a.cmd == "all" else sum(m["seconds"] for m in report.values())
    write_report_card(a, report, wall)


if __name__ == "__main__":
    main()
