"""train.py's pipeline from the command line: `--quick` takes a fresh
folder through every stage and writes the report card (report.json,
report.md, the curves, every stage's checkpoint) with pretraining measurably
learned; one stage alone reads the previous stage's checkpoint, or says what
to run first; a malformed data file stops a stage with its file and line,
and read_jsonl names the file and line of a missing field, invalid JSON or
a record that is not an object."""
import json
import math
import os

import pytest

import llm
import train

KEYS = ["pretrain.val_loss", "pretrain.bits_per_byte", "pretrain.paris_prob", "sft.accuracy_before",
        "sft.accuracy_after", "reward.accuracy", "ppo.judge_before", "ppo.judge_after",
        "ppo.reward_before", "ppo.reward_after", "ppo.kl", "dpo.judge_after",
        "finetune.domain_accuracy_before", "finetune.domain_accuracy_after",
        "finetune.trainable_fraction", "finetune.general_accuracy_before",
        "finetune.general_accuracy_after", "wall_seconds"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("quick"))
    train.main(["--quick", "--out", out])
    return out


def test_quick_run_writes_every_stage_and_the_report_card(quick_run):
    for stage in train.STAGES:
        model, tok, _, info = llm.load_checkpoint(os.path.join(quick_run, f"{stage}.safetensors"))
        assert info["stage"] == stage
    report = json.load(open(os.path.join(quick_run, "report.json")))
    for k in KEYS:
        assert isinstance(report[k], float), k
    for k in KEYS[:-1]:
        if "accuracy" in k or "judge" in k or "fraction" in k or "prob" in k:
            assert 0.0 <= report[k] <= 1.0, k
    assert report["ppo.kl"] >= 0.0 and 0 < report["finetune.trainable_fraction"] < 0.5
    md = open(os.path.join(quick_run, "report.md")).read()
    assert "| pretraining |" in md and "before" in md
    svgs = [f for f in os.listdir(quick_run) if f.endswith("_curve.svg")]
    assert "pretrain_curve.svg" in svgs and f"({svgs[0]})" in md
    assert os.path.exists(os.path.join(quick_run, "finetune.lora.safetensors"))


def test_pretraining_measurably_learned(quick_run):
    m = json.load(open(os.path.join(quick_run, "metrics.json")))
    model, *_ = llm.load_checkpoint(os.path.join(quick_run, "pretrain.safetensors"))
    assert m["val_loss"] < math.log(model.config.vocab_size) - 1.5     # uniform guessing: log V


def test_one_stage_alone_reads_the_previous_checkpoint(quick_run, capsys):
    train.main(["dpo", "--quick", "--out", quick_run, "--dpo-iters", "2"])
    out = capsys.readouterr().out
    assert "[dpo]" in out and "judge" in out


def test_a_stage_without_its_input_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match=r"no sft.safetensors; run `python train.py sft"):
        train.main(["ppo", "--quick", "--out", str(tmp_path)])


def test_malformed_data_file_names_file_and_line(quick_run, tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "a", "response": "b", "split": "train"}\n{"prompt": 3}\n')
    with pytest.raises(SystemExit, match=r"sft.jsonl:2"):
        train.main(["sft", "--quick", "--out", quick_run, "--sft-data", str(bad)])


def test_read_jsonl_reports_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: .*'response'"):
        train.read_jsonl(str(p), ("prompt", "response"))
    p.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        train.read_jsonl(str(p), ("prompt", "response"))
    p.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a JSON object"):
        train.read_jsonl(str(p), ("prompt",))
    ok = b'{"prompt": "a", "response": "b"}\n'
    for bad, says in ((b"[" * 100000 + b"]" * 100000, "nested"), (b"null", "expected a JSON object, got null"),
                      (b'{"prompt": "a\\ud800", "response": "b"}', "UTF-8")):
        p.write_bytes(ok + bad + b"\n")             # (a deep line was a RecursionError; null was skipped;
        with pytest.raises(ValueError, match=r"d.jsonl:2: .*" + says):  # a lone surrogate failed later, unnamed)
            train.read_jsonl(str(p), ("prompt", "response"))


TINY = ["--quick", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--vocab-size", "260", "--max-iters", "4",
        "--eval-interval", "2", "--eval-iters", "1", "--sft-iters", "2", "--reward-iters", "2",
        "--ppo-iters", "1", "--dpo-iters", "2", "--finetune-iters", "2", "--eval-limit", "3"]   # every stage, tiny


def test_seeds_run_every_seed_and_report_their_mean_and_spread(tmp_path):
    train.main(["--seeds", "0,1", "--out", str(tmp_path)] + TINY)
    runs = [json.load(open(tmp_path / f"seed-{s}" / "report.json")) for s in (0, 1)]
    report = json.load(open(tmp_path / "report.json"))
    assert report["seeds"] == [0, 1] and runs[0]["pretrain.val_loss"] != runs[1]["pretrain.val_loss"]
    for k in ("pretrain.val_loss", "reward.accuracy", "ppo.reward_after"):
        values = [r[k] for r in runs]
        assert math.isclose(report[k], sum(values) / 2) and report["spread"][k] == [min(values), max(values)]
    assert "[" in open(tmp_path / "report.md").read()
    # the card's answers and curves are seed 0's, said so; its figures only the means (seed 0's read as them)
    assert all(set(m) <= {"samples", "history"} for m in report["stages"].values())
    assert "answers before and after (seed 0)" in open(tmp_path / "report.md").read()
    # the spread file names what it was measured on: the settings and the data files' sha256
    assert json.load(open(tmp_path / "seed_spread.json"))["recipe"] == json.loads(json.dumps(
        train.recipe(train.parse(["--out", str(tmp_path)] + TINY))))


def test_seeds_with_resume_keep_the_seeds_already_done(tmp_path, monkeypatch):
    train.main(TINY + ["--seed", "0", "--out", str(tmp_path / "seed-0")])      # a seed run on its own
    kept = (tmp_path / "seed-0" / "report.json").read_text()
    ran = []
    real_run = train.run
    monkeypatch.setattr(train, "run", lambda b: ran.append(b.seed) or real_run(b))
    train.main(TINY + ["--seeds", "0,1", "--resume", "--out", str(tmp_path)])
    assert ran == [1] and (tmp_path / "seed-0" / "report.json").read_text() == kept
    report = json.load(open(tmp_path / "report.json"))
    assert report["seeds"] == [0, 1] and report["spread"]["pretrain.val_loss"][0] <= report["pretrain.val_loss"]
