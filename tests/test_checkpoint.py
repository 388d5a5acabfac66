import json
import os

import numpy as np
import pytest

import llm

TEXT = ("The capital of France is Paris. The capital of Italy is Rome. "
        "Gold has the symbol Au. Iron has the symbol Fe. ") * 40


def small():
    return (llm.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=300),
            llm.TrainConfig(batch_size=4, max_iters=12, warmup_iters=3, eval_interval=4,
                            eval_iters=2, seed=3))


def test_checkpoint_roundtrip(tmp_path):
    cfg, tc = small()
    tok = llm.Tokenizer.train(TEXT, 300)
    m = llm.GPT(llm.GPTConfig(**{**cfg.__dict__, "vocab_size": tok.vocab_size}))
    path = str(tmp_path / "c.safetensors")
    llm.save_checkpoint(path, m, tok, stage="test")
    m2, tok2, state, info = llm.load_checkpoint(path)
    assert info == {"stage": "test"} and state is None
    assert tok2.ranks == tok.ranks and m2.config == m.config
    ids = np.array([tok.encode("The capital of")])
    assert np.array_equal(m.forward(ids)[0], m2.forward(ids)[0])
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]       # nothing half-written left


def test_resume_ends_with_exactly_the_uninterrupted_weights(tmp_path):
    cfg, tc = small()
    full = llm.pretrain(TEXT, str(tmp_path / "a"), cfg, tc)
    assert llm.pretrain(TEXT, str(tmp_path / "b"), cfg, tc, stop_at=6) == {}   # "interrupted"
    resumed = llm.pretrain(TEXT, str(tmp_path / "b"), cfg, tc, resume=True)
    a, *_ = llm.load_checkpoint(str(tmp_path / "a" / "pretrain.safetensors"))
    b, _, state, _ = llm.load_checkpoint(str(tmp_path / "b" / "pretrain.safetensors"))
    assert state.step == 12
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    assert full["val_loss"] == resumed["val_loss"]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in ("train_loss", "val_loss", "bits_per_byte", "steps", "tokens_per_second", "wall_seconds"):
        assert key in metrics


def test_resume_from_the_checkpoint_of_an_evaluation(tmp_path):
    """A run killed at any point resumes from its last evaluation's
    checkpoint and still ends with the uninterrupted run's weights."""
    import shutil
    cfg, tc = small()
    llm.pretrain(TEXT, str(tmp_path / "a"), cfg, tc)
    ckpt = tmp_path / "b" / "pretrain.safetensors"

    def log(step, *_):                   # keep the checkpoint as it was at step 8
        if step == 8:
            shutil.copy(ckpt, tmp_path / "at8.safetensors")
    llm.pretrain(TEXT, str(tmp_path / "b"), cfg, tc, stop_at=10, log=log)
    shutil.copy(tmp_path / "at8.safetensors", ckpt)      # as if killed at step 9 or 10
    llm.pretrain(TEXT, str(tmp_path / "b"), cfg, tc, resume=True)
    a, *_ = llm.load_checkpoint(str(tmp_path / "a" / "pretrain.safetensors"))
    b, _, state, _ = llm.load_checkpoint(str(ckpt))
    assert state.step == 12 and len(state.history) == 12
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k


def test_pretraining_lowers_the_loss(tmp_path):
    cfg, tc = small()
    tc.max_iters, tc.eval_interval, tc.learning_rate = 60, 60, 3e-3
    m = llm.pretrain(TEXT, str(tmp_path), cfg, tc)
    model, *_ = llm.load_checkpoint(str(tmp_path / "pretrain.safetensors"))
    assert m["val_loss"] < np.log(model.config.vocab_size) - 1.5     # from ~uniform at init


def test_safetensors_layout_is_standard(tmp_path):
    p = tmp_path / "t.safetensors"
    llm.save_safetensors(str(p), {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"k": "v"})
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    import hashlib
    assert header["__metadata__"] == {"k": "v", "sha256": hashlib.sha256(raw[8 + n:]).hexdigest()}
    assert (8 + n) % 8 == 0
    assert np.array_equal(np.frombuffer(raw[8 + n:], np.float32), np.arange(6))


@pytest.mark.parametrize("content,match", [
    (None, "no such checkpoint"),
    (b"", "only 0 bytes"),
    (b"\xff" * 20, "truncated"),
    (b"\x04\x00\x00\x00\x00\x00\x00\x00nope", "bad header"),
])
def test_bad_files_are_clear_errors(tmp_path, content, match):
    p = tmp_path / "x.safetensors"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        llm.load_checkpoint(str(p))
    assert "x.safetensors" in str(e.value)


def test_truncated_and_foreign_checkpoints(tmp_path):
    cfg, _ = small()
    tok = llm.byte_tokenizer()
    m = llm.GPT(llm.GPTConfig(**{**cfg.__dict__, "vocab_size": tok.vocab_size}))
    p = tmp_path / "c.safetensors"
    llm.save_checkpoint(str(p), m, tok)
    raw = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="cut.safetensors.*truncated"):
        llm.load_checkpoint(str(tmp_path / "cut.safetensors"))
    llm.save_safetensors(str(tmp_path / "foreign.safetensors"), {"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="foreign.safetensors.*not an llm checkpoint"):
        llm.load_checkpoint(str(tmp_path / "foreign.safetensors"))
