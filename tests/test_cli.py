"""The command line's answer to a user's mistake: one line on stderr that
names the flag or file, exit status 2, no traceback; and what it says and
keeps when a run is resumed, interrupted, or its loss turns to NaN."""
import json
import os
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
             "nofield.jsonl": b'{"prompt": "a"}\n', "garbage.safetensors": b"\x10" * 64}
    for name, data in files.items():
        (d / name).write_bytes(data)
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
    ("finetune --domain-data {d}/empty.jsonl", "--domain-data"),
    ("sft --out {d}/empty_run", "pretrain.safetensors"),
    ("pretrain --resume --out {d}/bad_resume", "--resume"),
    ("pretrain --resume --n-layer 2 --out {d}/run", "--n-layer"),
    ("sample --out {d}/run --seed -1", "--seed"), ("sample --out {d}/run --top 0", "--top"),
    ("sample --out {d}/run --temperature -1", "--temperature"), ("sample --out {d}/run --top-p 0", "--top-p"),
    ("sample --out {d}/run --max-tokens -2", "--max-tokens"), ("sample --ckpt {d}/garbage.safetensors", "garbage"),
    ("attention --out {d}/run --svg {d}/short.txt/x.svg", "--svg"), ("attention --out {d}/run --layer 9", "--layer"),
    ("chat --out {d}/empty_run", "no stage checkpoint"), ("sft --kl-coef 1", "--kl-coef"),
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


def test_the_whole_process_says_one_line_without_a_traceback(folder):
    for args in ("--n-layer 0", f"sft --sft-data {folder}/bad.jsonl --out {folder}/out"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args.split(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_resume_says_what_it_does(folder, tmp_path, capsys):
    train.main(["pretrain", "--out", str(tmp_path / "new")] + TINY)
    capsys.readouterr()
    train.main(["pretrain", "--resume", "--out", str(tmp_path / "new")] + TINY[:-6] + ["--max-iters", "6"])
    out = capsys.readouterr().out
    assert "resuming" in out and "--max-iters 6 replaces the checkpoint's 4" in out


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
