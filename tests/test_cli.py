"""The command line's answer to a user's mistake: one line on stderr that
names the flag or file, exit status 2, no traceback; and what it says and
keeps when a run is resumed, interrupted, or its loss turns to NaN."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import llm
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--vocab-size", "260",
        "--batch-size", "2", "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Bad input files, and a tiny pretrained run folder."""
    d = tmp_path_factory.mktemp("cli")
    files = {"short.txt": b"too short", "latin1.txt": "caf\xe9".encode("latin-1") * 50,
             "bad.jsonl": b'{"prompt": "a", "response": "b"}\n{oops\n',
             "empty.jsonl": b"", "testonly.jsonl": b'{"prompt": "a", "response": "b", "split": "test"}\n',
             "split.jsonl": b'{"prompt": "a", "response": "b", "split": "dev"}\n',
             "nonutf8.jsonl": b'{"prompt": "\xff", "response": "b"}\n',
             "nofield.jsonl": b'{"prompt": "a"}\n', "garbage.safetensors": b"\x10" * 64,
             "blank.jsonl": b'{"prompt": "x", "response": " \\n\\t"}\n',
             "noprompt.jsonl": b'{"prompt": "", "chosen": "Sure! y.", "rejected": "y."}\n',
             "same.jsonl": b'{"prompt": "x", "chosen": "Sure! y.", "rejected": "Sure! y. "}\n',
             "flaw.jsonl": b'{"prompt": "x", "chosen": "Sure! y.", "rejected": "y. And", "flaw": "Unended"}\n',
             "leak.jsonl": b'{"prompt": "Hi?", "response": "a"}\n{"prompt": "Yo?", "response": "b"}\n'
                           b'{"prompt": " Hi?\\n", "response": "c", "split": "test"}\n',
             "misspelt.jsonl": b'{"prompt": "x", "response": "y", "Split": "test"}\n',
             "kindlist.jsonl": b'{"prompt": "a", "response": "b", "kind": ["x"]}\n',
             "pair.jsonl": b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "b", "split": "test"}\n',
             "few.jsonl": b"".join(b'{"prompt": "%d?", "chosen": "Sure! %d.", "rejected": "%d.", "flaw": "plain", '
                                   b'"split": "%s"}\n' % (i, i, i, b"test" if i == 3 else b"train") for i in range(4))}
    for name, data in files.items():
        (d / name).write_bytes(data)
    llm.save_safetensors(str(d / "adapter.lora.safetensors"), {"h.0.attn.c_attn.lora_A": np.zeros((16, 2), np.float32)},
                         {"format": "llm-lora-v1", "lora": "{}"})
    (d / "bad_resume").mkdir()
    (d / "bad_resume" / "pretrain.safetensors").write_bytes(b"\x00" * 100)
    train.main(["pretrain", "--out", str(d / "run")] + TINY)
    return d


BAD = [  # (arguments, the flag or file the one line must name)
    ("--n-embd 64 --n-head 3", "--n-embd"), ("--n-layer 0", "--n-layer"), ("--dropout 1.5", "--dropout"),
    ("--max-iters 0", "--max-iters"), ("--batch-size 0", "--batch-size"), ("--eval-interval 0", "--eval-interval"),
    ("--grad-accum 0", "--grad-accum"), ("--eval-iters 0", "--eval-iters"), ("--warmup-iters -1", "--warmup-iters"),
    ("--learning-rate nan", "--learning-rate"), ("--learning-rate -1", "--learning-rate"), ("--beta2 2", "--beta2"),
    ("--vocab-size 10", "--vocab-size"), ("--vocab-size abc", "--vocab-size"), ("--device tpu", "--device"),
    ("--sft-lr inf", "--sft-lr"), ("--replay 1.5", "--replay"), ("--seed -1", "--seed"), ("--lora-r 0", "--lora-r"),
    ("--out {d}/short.txt", "--out"), ("--out {d}/short.txt/sub", "--out"),
    ("pretrain --data {d}/nothing.txt", "--data"), ("pretrain --data {d}/short.txt", "--data"),
    ("pretrain --data {d}/latin1.txt", "--data"),
    ("sft --sft-data {d}/bad.jsonl", "bad.jsonl:2"), ("sft --sft-data {d}/empty.jsonl", "--sft-data"),
    ("sft --sft-data {d}/testonly.jsonl", '"split": "train"'), ("sft --sft-data {d}/split.jsonl", "split.jsonl:1"),
    ("sft --sft-data {d}/nonutf8.jsonl", "nonutf8.jsonl:1"), ("sft --sft-data {d}/nofield.jsonl", "'response'"),
    ("sft --sft-data {d}/missing.jsonl", "--sft-data"), ("reward --preferences-data {d}/bad.jsonl", "bad.jsonl:1: expected a string field 'chosen'"),
    ("sft --sft-data {d}/kindlist.jsonl", "kindlist.jsonl:1"),
    ("sft --sft-data {d}/blank.jsonl", "blank.jsonl:1: expected a non-empty string field 'response', got ' \\n\\t'"),
    ("reward --preferences-data {d}/noprompt.jsonl", "noprompt.jsonl:1: expected a non-empty string field 'prompt'"),
    ("reward --preferences-data {d}/same.jsonl", "same.jsonl:1: expected 'rejected' to differ from 'chosen'"),
    ("reward --preferences-data {d}/flaw.jsonl",
     "flaw.jsonl:1: expected a flaw among wrong, rude, rambling, unended, plain, got 'Unended'"),
    ("sft --sft-data {d}/leak.jsonl", "leak.jsonl:3: a test prompt that is also the training prompt of line 1:"
     " held-out figures need unseen prompts"),
    ("sft --sft-data {d}/misspelt.jsonl", "misspelt.jsonl:1: unexpected field 'Split' (expected some of: prompt, response, "),
    ("finetune --domain-data {d}/empty.jsonl", "--domain-data"),
    ("sft --out {d}/empty_run", "pretrain.safetensors"),
    ("pretrain --resume --out {d}/bad_resume", "--resume"),
    ("pretrain --resume --n-layer 2 --out {d}/run", "--n-layer"),
    ("sample --out {d}/run --seed -1", "--seed"), ("sample --out {d}/run --top 0", "--top"),
    ("sample --out {d}/run --temperature -1", "--temperature"), ("sample --out {d}/run --top-p 0", "--top-p"),
    ("sample --out {d}/run --max-tokens -2", "--max-tokens"), ("sample --ckpt {d}/garbage.safetensors", "garbage"),
    ("attention --out {d}/run --svg {d}/short.txt/x.svg", "--svg"), ("attention --out {d}/run --layer 9", "--layer"),
    ("chat --out {d}/empty_run", "no stage checkpoint"), ("sft --kl-coef 1", "--kl-coef"),
    ("pretrain --min-lr 0.01 --learning-rate 0.001 --data {d}/nothing.txt",
     "--min-lr: expected at most --learning-rate"),
    ("finetune --lora-targets= --out {d}/run", "--lora-targets"),
    ("finetune --lora-targets ln_1 --out {d}/run", "--lora-targets"),
    ("finetune --lora-targets bogus --out {d}/run", "--lora-targets"),
    ("--reward-lora 2 --lora-targets ln_1 --data {d}/nothing.txt", "--lora-targets"),
    ("--seeds 0,1 --seed 3 --data {d}/nothing.txt", "--seeds"),
    ("chat --out {d}/run --max-tokens -1", "--max-tokens"), ("chat --out {d}/run --temperature -1", "--temperature"),
    ("chat --out {d}/run --top-p 5", "--top-p"), ("chat --out {d}/run --top-k 0", "--top-k"),
    ("tokens --ckpt {d}/adapter.lora.safetensors", "a LoRA adapter, not a checkpoint"),
    ("sample --out {d}/run --prompt ab\udcff", "--prompt: cannot be encoded"),      # bytes not UTF-8, as argv has them
    ("attention --out {d}/run --text ab\udcff", "--text: cannot be encoded"),
    ("ppo --ptx-coef nan", "--ptx-coef"), ("ppo --ptx-coef -1", "--ptx-coef"), ("ppo --ptx-coef inf", "--ptx-coef"),
]


@pytest.mark.parametrize("args,names", BAD)
def test_a_mistake_is_one_line_naming_it_and_exit_status_2(folder, capsys, args, names):
    argv = args.format(d=folder).split()
    if "--out" not in argv and argv[0] not in ("sample", "attention", "chat"):
        argv += ["--out", str(folder / "out")]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, (args, err)
    assert len(err.splitlines()) == 1 and names in err and "Traceback" not in err, (args, err)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """A tiny run folder with every stage's checkpoint."""
    d = tmp_path_factory.mktemp("whole")
    train.main(["--quick"] + TINY + ["--sft-iters", "2", "--reward-iters", "2", "--ppo-iters", "1", "--dpo-iters", "2",
                                     "--finetune-iters", "2", "--eval-limit", "3", "--out", str(d)])
    return d


def copy_of(whole, tmp_path):
    return str(shutil.copytree(whole, tmp_path / "run"))


LATER_BAD = [  # (arguments, what the one line names), on a run folder with every stage
    ("sft --data {d}/short.txt", "--data"), ("finetune --finetune-replay 0.5 --data {d}/short.txt", "--data"),
    ("ppo --preferences-data {d}/few.jsonl", "--preferences-data: PPO samples 16"),
    ("finetune --sft-data {d}/pair.jsonl", "--sft-data: fine-tuning mixes in"),
]


@pytest.mark.parametrize("args,names", LATER_BAD)
def test_a_later_stage_s_mistake_is_said_before_it_measures_or_trains(folder, whole, tmp_path, capsys, args, names):
    with pytest.raises(SystemExit) as e:
        train.main(args.format(d=folder).split() + ["--out", copy_of(whole, tmp_path), "--eval-limit", "2"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and names in err, (args, err)
    assert "accuracy" not in out and "judge" not in out, out       # nothing measured yet


def test_a_damaged_json_file_of_the_run_folder_is_named(whole, tmp_path, monkeypatch, capsys):
    run = copy_of(whole, tmp_path)
    (tmp_path / "run" / "sft.json").write_text("garbage")
    (tmp_path / "seeds" / "seed-0").mkdir(parents=True)
    (tmp_path / "seeds" / "seed-0" / "report.json").write_text("{}")
    for argv, name in ((["dpo", "--out", run, "--dpo-iters", "1", "--eval-limit", "2"], "sft.json"),
                       (["--seeds", "0", "--resume", "--out", str(tmp_path / "seeds")], "seed-0/report.json")):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and name in err and "Traceback" not in err, err
    (tmp_path / "spread.json").write_text("[]")                  # the default run's spread, for a default card
    monkeypatch.setattr(train, "SPREAD", str(tmp_path / "spread.json"))
    with pytest.raises(SystemExit, match="spread.json"):
        train.write_report_card(train.parse(["--out", str(tmp_path)]), {}, 1.0)


def test_resume_trains_again_a_stage_whose_checkpoint_is_missing(whole, tmp_path, capsys):
    """--resume keeps a stage only with both its results and its checkpoint."""
    run = copy_of(whole, tmp_path)
    os.remove(os.path.join(run, "sft.safetensors"))
    train.main(["--quick"] + TINY + ["--sft-iters", "2", "--reward-iters", "2", "--ppo-iters", "1", "--dpo-iters", "2",
                                     "--finetune-iters", "2", "--eval-limit", "3", "--out", run, "--resume"])
    out = capsys.readouterr().out
    assert "[reward] done already" in out and "[sft] done already" not in out
    assert os.path.exists(os.path.join(run, "sft.safetensors"))


def test_a_stage_checkpoint_that_is_another_stage_s_is_named(whole, tmp_path, capsys):
    run = copy_of(whole, tmp_path)
    for src, dst, stage in (("sft", "reward", "dpo"), ("reward", "sft", "ppo"), ("sft", "pretrain", "sft")):
        shutil.copy(os.path.join(whole, src + ".safetensors"), os.path.join(run, dst + ".safetensors"))
        with pytest.raises(SystemExit) as e:
            train.main([stage, "--quick", "--out", run, "--eval-limit", "2"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and f"{dst}.safetensors: expected a {dst} checkpoint" in err, err
        shutil.copy(os.path.join(whole, dst + ".safetensors"), os.path.join(run, dst + ".safetensors"))


def test_data_without_a_kind_trains_and_a_stage_is_saved_before_its_report_can_fail(whole, tmp_path, monkeypatch):
    """The judge's breakdown by kind needs no "kind" (README's format has none); and a stage keeps
    what it trained (finetune: its checkpoint and adapter together) should its report fail."""
    run, data = copy_of(whole, tmp_path), tmp_path / "nokind.jsonl"
    data.write_text('{"prompt": "What is the capital of Peru?", "response": "The capital of Peru is Lima.",'
                    ' "split": "train"}\n{"prompt": "What is the capital of Chile?", "response": "Santiago.",'
                    ' "split": "test"}\n')
    for stage, flag in (("sft", "--sft-data"), ("finetune", "--domain-data")):
        train.main([stage, "--out", run, flag, str(data), f"--{stage}-iters", "1", "--eval-limit", "2"])
    from data import world

    def fail(*args):
        raise RuntimeError("the report failed")
    monkeypatch.setattr(world, "breakdown", fail)
    for stage, files in (("sft", ["sft"]), ("finetune", ["finetune", "finetune.lora"])):
        for f in files:
            os.remove(os.path.join(run, f + ".safetensors"))
        with pytest.raises(RuntimeError):
            train.main([stage, "--out", run, f"--{stage}-iters", "1", "--eval-limit", "2"])
        assert all(os.path.exists(os.path.join(run, f + ".safetensors")) for f in files), stage


def test_the_whole_process_says_one_line_without_a_traceback(folder):
    for args in ("--n-layer 0", f"sft --sft-data {folder}/bad.jsonl --out {folder}/out"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args.split(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_running_out_of_memory_says_so_and_which_flags_shrink_the_run(tmp_path, monkeypatch, capsys):
    def pretrain(*args, **kw):
        raise MemoryError()                # (its message is empty, as for --n-layer 100000000)
    monkeypatch.setattr(llm, "pretrain", pretrain)
    with pytest.raises(SystemExit) as e:
        train.main(["pretrain", "--out", str(tmp_path)] + TINY)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "out of memory" in err and "--n-layer" in err and "--batch-size" in err, err


def test_the_card_quotes_the_default_run_s_spread_only_for_a_default_run(tmp_path, capsys):
    d = str(tmp_path)
    for argv, quoted in ((["--out", d], True), (["--seed", "3", "--out", d], True), (["sft", "--out", d], False),
                         (["pretrain", "--resume", "--out", d], False), (["--resume", "--out", d], False),
                         (["--quick", "--out", d], False), (["--sft-iters", "5", "--out", d], False)):
        train.write_report_card(train.parse(argv), {}, 1.0)
        assert ("(±x)" in (tmp_path / "report.md").read_text(encoding="utf-8")) == quoted, argv


def test_the_spread_of_other_data_or_settings_is_not_quoted(tmp_path, monkeypatch):
    """data/seed_spread.json is the default run's spread over seeds: the card
    of a run on edited data files, or under other defaults, does not quote it."""
    d, a = str(tmp_path), train.parse(["--out", str(tmp_path)])
    assert json.load(open(train.SPREAD))["recipe"] == json.loads(json.dumps(train.recipe(a)))   # (the file's own)
    spread = tmp_path / "spread.json"
    monkeypatch.setattr(train, "SPREAD", str(spread))
    for change in ({}, {"sft_iters": 999}, {"domain_data": "0" * 16}):
        spread.write_text(json.dumps({"seeds": [0, 1], "spread": {"sft.accuracy_after": [0.8, 0.9]},
                                      "recipe": {**train.recipe(a), **change}}))
        train.write_report_card(a, {"sft": {"accuracy_before": 0.0, "accuracy_after": 0.85}}, 1.0)
        md = (tmp_path / "report.md").read_text(encoding="utf-8")
        assert ("(±5.0%)" in md) == (not change) and ("not quoted" in md) == bool(change), change


def test_fine_tuning_s_target_keeps_general_accuracy_within_2_points():
    figures = {"finetune.domain_accuracy_after": 0.9, "finetune.trainable_fraction": 0.02,
               "finetune.general_accuracy_before": 0.80}
    for after, met, fraction in ((0.77, False, 0.02), (0.785, True, 0.02), (0.785, False, 0.031)):
        flat = {**figures, "finetune.general_accuracy_after": after, "finetune.trainable_fraction": fraction}
        assert train.targets_met(flat) == [("task fine-tuning", train.TARGETS[-1][1], met)], (after, fraction)


def test_the_default_run_s_card_says_which_targets_it_met(tmp_path, capsys):
    """README holds the default run to targets: its card says which it met
    (a seed's misses were to be found only by reading README's table)."""
    stages = {"sft": {"accuracy_before": 0.0, "accuracy_after": 0.84},
              "reward": {"accuracy": 0.99, "by_flaw": {"wrong": 0.87, "rude": 1.0}},
              "ppo": {"polite_before": 0.2, "polite_after": 0.97, "correct_before": 0.98, "correct_after": 0.97},
              "dpo": {"polite_after": 0.99, "correct_before": 0.98, "correct_after": 0.98}}
    stages = {s: {**dict.fromkeys(train.FIGURES[s], 0.5), **m} for s, m in stages.items()}   # (the other figures)
    for argv, shown in ((["--quick", "--out", str(tmp_path)], False), (["--out", str(tmp_path)], True)):
        train.write_report_card(train.parse(argv), stages, 1.0)
        md = (tmp_path / "report.md").read_text(encoding="utf-8")
        assert ("## Targets" in md) == shown, argv
    for line in ("- instruction tuning: held-out exact match >= 85%: **missed**",
                 "- reward model: held-out pairs >= 95%, every flaw's >= 90%: **missed**",
                 "- PPO: polite >= 90%, correct no lower: **missed**", "- DPO: polite >= 90%, correct no lower: **met**"):
        assert line in md, line
    assert "task fine-tuning" not in md.split("## Targets")[1]               # (it did not run)
    assert json.load(open(tmp_path / "report.json"))["targets_met"] == {
        "instruction tuning": False, "reward model": False, "PPO": False, "DPO": True}


def test_resume_says_what_it_does(folder, tmp_path, capsys):
    train.main(["pretrain", "--out", str(tmp_path / "new")] + TINY)
    capsys.readouterr()
    train.main(["pretrain", "--resume", "--out", str(tmp_path / "new")] + TINY[:-6] + ["--max-iters", "6"])
    out = capsys.readouterr().out
    assert "resuming" in out and "--max-iters 6 replaces the checkpoint's 4" in out


def test_a_context_window_shorter_than_the_paris_probe_trains_and_resumes(tmp_path, capsys):
    """" Paris" is 6 byte tokens: a window of 3 reads each from the tokens just before it."""
    args = ["pretrain", "--out", str(tmp_path)] + TINY[:6] + ["--block-size", "3"] + TINY[8:]
    train.main(args)
    train.main(args + ["--resume"])
    m = json.load(open(tmp_path / "pretrain.json"))
    assert len(m["paris_tokens"]) == 6 and 0 < m["paris_prob"] < 1


def test_resume_takes_the_vocab_size_the_run_was_given_where_the_text_had_pairs_for_fewer(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)                  # pairs for 272 tokens, not 2048
    args = ["pretrain", "--out", str(tmp_path / "run"), "--data", str(text)] + TINY[:8] + TINY[10:]
    train.main(args + ["--vocab-size", "2048"])
    train.main(args + ["--vocab-size", "2048", "--resume"])
    assert "resuming" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--vocab-size: .* has vocab_size 272, not 270"):
        train.main(args + ["--vocab-size", "270", "--resume"])


@pytest.mark.parametrize("info,names", [
    (None, "--resume: "), ({"train": [4]}, "--resume: "), ({"train": {"max_iters": "4"}}, "--resume: "),
    ({"train": {"max_iters": 4.5}}, "--resume: "), ({"train": {"seed": True}}, "--resume: "),
    ({"train": {"eval_limit": 3}}, "--resume: "), ({"ranks": "2"}, "--resume: "), ({"ranks": 0}, "--resume: "),
    ({"train": {"max_iters": 0}}, "--max-iters: "), ({"train": {"beta2": 1.5}}, "--beta2: "),     # as the flags are
    ({"train": {"learning_rate": float("nan")}}, "--learning-rate: "),
], ids=["no-state", "train-list", "text", "float", "bool", "not-a-setting", "ranks-text", "ranks-0", "max-iters-0",
        "beta2", "lr-nan"])
def test_resume_checks_the_checkpoint_s_settings(folder, tmp_path, capsys, info, names):
    """A checkpoint with no training state, or with settings of the wrong
    type or range, was an AttributeError or TypeError (or trained with them)."""
    model, tok, state, good = llm.load_checkpoint(str(folder / "run" / "pretrain.safetensors"))
    if info is not None:                                # the good settings, one changed
        changed = info.get("train", {})
        info = {**good, **info, "train": {**good["train"], **changed} if isinstance(changed, dict) else changed}
    llm.save_checkpoint(str(tmp_path / "pretrain.safetensors"), model, tok, state if info else None, **(info or good))
    with pytest.raises(SystemExit) as e:
        train.main(["pretrain", "--resume", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert names in err and "pretrain.safetensors" in err and "Traceback" not in err, err


def test_resuming_a_finished_pretraining_keeps_its_figures(tmp_path, capsys):
    """No step runs: its pretrain.json and metrics.json stay (they said 0
    tokens/s in no time)."""
    train.main(["pretrain", "--out", str(tmp_path)] + TINY)
    kept = {f: (tmp_path / f).read_text() for f in ("pretrain.json", "metrics.json")}
    capsys.readouterr()
    train.main(["pretrain", "--resume", "--out", str(tmp_path)])
    assert " 0 tokens/s" not in capsys.readouterr().out
    assert {f: json.loads((tmp_path / f).read_text()) for f in kept} == {f: json.loads(t) for f, t in kept.items()}


def test_svg_pictures_are_written_atomically(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(llm, "atomic_write", lambda path, data: written.append((path, data)))
    path = train.svg_line_chart({"loss": [(1, 2.0), (2, 1.0)]}, str(tmp_path / "c.svg"), "t", "step", "loss")
    assert [p for p, _ in written] == [path] and written[0][1].startswith(b"<svg")


def test_resume_without_a_checkpoint_says_it_starts_anew(tmp_path, capsys):
    train.main(["pretrain", "--resume", "--out", str(tmp_path)] + TINY)
    assert "there is no" in capsys.readouterr().out and (tmp_path / "pretrain.safetensors").exists()


def test_a_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = llm.lm_loss, []

    def loss(model, batch):
        calls.append(1)
        l, g = real(model, batch)
        return (float("nan") if len(calls) == 3 else l), g
    monkeypatch.setattr(llm, "lm_loss", loss)
    with pytest.raises(SystemExit) as e:
        train.main(["pretrain", "--out", str(tmp_path)] + TINY)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "loss: nan at step 3" in err and "last good checkpoint" in err
    _, _, state, _ = llm.load_checkpoint(str(tmp_path / "pretrain.safetensors"))
    assert state.step == 2 and all(np.isfinite(l) for _, l, _ in state.history)


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "pretrain", "--out", str(tmp_path)] + TINY[:-6] + [
        "--max-iters", "100000", "--eval-interval", "1", "--eval-iters", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "pretrain.safetensors").exists() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "pretrain.safetensors" in err and "--resume" in err


def test_the_ctrl_c_hint_repeats_the_command_and_its_flags_with_resume_once(tmp_path):
    out = str(tmp_path / "a run")                                 # (quoted for the shell)
    for argv, hint in ((["--quick", "--out", out], f"--quick --out '{out}' --resume"),
                       (["pretrain", "--resume", "--max-iters", "5"], "pretrain --resume --max-iters 5"),
                       (["--seeds", "0,1", "--out", out], f"--seeds 0,1 --out '{out}' --resume"),
                       (["sft", "--sft-iters", "3", "--out", out], f"sft --sft-iters 3 --out '{out}'")):
        assert f"`python train.py {hint}`" in train.resume_hint(train.parse(argv), "sft"), argv


def test_the_ctrl_c_hint_under_mpirun_starts_as_many_ranks(monkeypatch):
    monkeypatch.setattr(llm.world, "size", 3)
    assert "`mpirun -n 3 python train.py --quick --resume`" in train.resume_hint(train.parse(["--quick"]), "sft")


def test_chat_leaves_on_ctrl_c_at_the_prompt_and_stops_an_answer_on_ctrl_c():
    model = llm.GPT(llm.GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16))
    tok = llm.byte_tokenizer()
    lines = iter(["hello"])

    def reader(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None

    out = []

    class Out:
        def write(self, s):
            out.append(s)
            if len(out) == 5:                   # the answer's first tokens: Ctrl-C
                raise KeyboardInterrupt

        def flush(self):
            pass
    history = train.chat_loop(model, tok, reader, Out(), max_tokens=10, seed=0)
    assert "(stopped)" in "".join(out) and len(history) == 1


def test_chat_says_its_seed_and_the_seed_repeats_the_conversation():
    model = llm.GPT(llm.GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=32))
    tok = llm.byte_tokenizer()

    def talk(seed):
        lines, out = iter(["hello", "again", "/quit"]), []
        out_file = type("Out", (), {"write": lambda self, s: out.append(s), "flush": lambda self: None})()
        history = train.chat_loop(model, tok, lambda _: next(lines), out_file, max_tokens=8, temperature=1.0, seed=seed)
        return history, "".join(out)
    history, said = talk(None)
    seed = int(re.search(r"--seed (\d+) repeats", said).group(1))        # (it was never said)
    assert talk(seed)[0] == history


def test_an_answer_is_right_by_the_judge_or_else_by_its_reference():
    """A user's own questions, which the judge knows nothing of, are
    measured against their references (before, every answer was wrong)."""
    assert train.is_right("What is 2+2?", " 4.", ["4."]) and not train.is_right("What is 2+2?", "5.", ["4."])
    q = "What is the capital of France?"                      # the judge's: the reference does not matter
    assert train.is_right(q, "The capital of France is Paris.", ["Bananas."])
    assert not train.is_right(q, "Bananas.", ["Bananas."])
    assert train.is_right("What is 2+2?", "Four.", ["4.", "Four."])           # any one of its references
    assert not train.is_right("What is 2+2?", "5.", [])                       # none: never right


def test_held_out_answers_are_judged_as_they_ended(monkeypatch):
    """An answer that never closed its turn is judged so (the judge's
    endedness), and counted among those that did not end."""
    prompts = ["What is the capital of France?", "What is the capital of Spain?"]
    texts = ["Sure! The capital of France is Paris.", "Sure! The capital of Spain is Madrid."]
    monkeypatch.setattr(llm, "answers", lambda model, tok, ps: (texts, [False, True], None))
    monkeypatch.setattr(llm, "score_conversations", lambda rm, tok, convs: np.zeros(len(convs)))
    m, _ = train.judge_answers(None, llm.byte_tokenizer(), None, prompts)
    w = train.world()
    assert w.judge(prompts[0], texts[0], False) < w.judge(prompts[0], texts[0], True)
    assert m["judge"] == (w.judge(prompts[0], texts[0], False) + w.judge(prompts[1], texts[1], True)) / 2
    assert m["ended"] == 0.5 and m["correct"] == 1.0 and m["polite"] == 1.0


def test_progress_writes_where_stdout_is_when_it_is_made(monkeypatch):
    """Ranks other than 0 print nothing: their stdout is replaced, and a
    Progress line went to the stdout train.py was imported with (every rank's)."""
    import io
    s = io.StringIO()
    monkeypatch.setattr(sys, "stdout", s)
    train.Progress("x")(2, 2, 1.0, None, 10.0, 1.0)
    assert "x step 2/2" in s.getvalue()


def test_eta_counts_this_runs_own_steps():
    import io
    s = io.StringIO()
    p = train.Progress("x", stream=s)
    p(110, 200, 1.0, 0.5, 100.0, 10.0, 100)      # 10 steps in 10 s since the resume at 100
    assert "ETA 90s" in s.getvalue()


@pytest.mark.skipif(llm._fastops is None, reason="fastops not built: no kernels to time")
def test_a_build_s_first_use_says_it_times_the_kernels_before_training_starts(tmp_path, monkeypatch, capsys):
    """The first use of a build times each kernel against NumPy (about 30 s):
    train.py says so, and does it before a stage's clock starts (it had been
    inside pretraining's first step: 30 s of silence, then an ETA of hours)."""
    said = []                                                   # what was printed when the timing began
    monkeypatch.setattr(llm, "_CHOICE", None)
    monkeypatch.setattr(llm, "calibration_path", lambda lib=None: str(tmp_path / "calibration.json"))
    monkeypatch.setattr(llm, "calibrate", lambda: said.append(capsys.readouterr().out) or
                        {f: {"use": True} for f in llm.FAMILIES})
    train.main(["tokens", "--text", "hello"])                   # no kernels: nothing timed
    assert said == []
    train.main(["pretrain", "--out", str(tmp_path / "run")] + TINY)
    assert len(said) == 1 and said[0].rstrip().endswith("(about 30 s) ...") and "[pretrain]" not in said[0]
    assert "[pretrain]" in capsys.readouterr().out
    train.main(["pretrain", "--out", str(tmp_path / "again")] + TINY)
    assert len(said) == 1                                       # kept beside the library: once a build


# ---- data files, a stage's input, the held-out sets' size, saving before the report ----

def test_a_test_prompt_trained_on_a_later_line_is_a_leak_too(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "q", "response": "a", "split": "test"}\n'
                 '{"prompt": "other", "response": "b", "split": "test"}\n'
                 '{"prompt": " q ", "response": "c", "split": "train"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: a test prompt that is also the training prompt of line 3"):
        train.read_jsonl(str(p), ("prompt", "response"))


def test_a_stage_does_not_fall_back_to_another_stage_s_checkpoint(whole, tmp_path):
    """reward needs sft.safetensors: with only pretrain's in the folder it says so, it does not
    train a reward model on the newest checkpoint there."""
    run = copy_of(whole, tmp_path)
    for name in os.listdir(run):
        if name.endswith(".safetensors") and name != "pretrain.safetensors":
            os.remove(os.path.join(run, name))
    with pytest.raises(SystemExit, match=r"no sft.safetensors; run `python train.py sft --out "):
        train.main(["reward", "--out", run, "--reward-iters", "1", "--eval-limit", "2"])
    assert not os.path.exists(os.path.join(run, "reward.safetensors"))


def test_eval_limit_caps_every_held_out_set_but_not_training():
    import argparse
    a = argparse.Namespace(eval_limit=3, sft_data=None)
    train_rows, test_rows = train.read_data(a, "sft", ("prompt", "response"))
    assert len(test_rows) == 3 and len(train_rows) == len(train.read_data(argparse.Namespace(
        eval_limit=None, sft_data=None), "sft", ("prompt", "response"))[0]) > 3
    assert len(train.novel_records(a)) == 3
    assert len(train.novel_records(argparse.Namespace(eval_limit=None))) > 3


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_reward_and_rlhf_stages_save_before_their_report(whole, tmp_path, monkeypatch, stage):
    run = copy_of(whole, tmp_path)
    os.remove(os.path.join(run, stage + ".safetensors"))
    name, before = ("reward_accuracy", 1) if stage == "reward" else ("judge_answers", 2)
    owner = llm if stage == "reward" else train
    real, calls = getattr(owner, name), []

    def fail_after_training(*a, **kw):
        calls.append(1)
        if len(calls) > before:
            raise RuntimeError("the report failed")
        return real(*a, **kw)
    monkeypatch.setattr(owner, name, fail_after_training)
    with pytest.raises(RuntimeError):
        train.main([stage, "--out", run, f"--{stage}-iters", "1", "--eval-limit", "2"])
    assert os.path.exists(os.path.join(run, stage + ".safetensors"))
