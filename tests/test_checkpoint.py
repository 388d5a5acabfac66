"""Checkpoints (llm.py section 9) and the pretraining runs that write them
(section 5): a checkpoint round-trips model, tokenizer and stage, written
atomically; a resumed run, from its end or from any evaluation's
checkpoint, ends with the uninterrupted run's weights bit for bit;
pretraining lowers the loss and writes its metrics; the safetensors layout
is the standard one, and bad, truncated or foreign files, impossible
metadata or tensors of another dtype than the config's, are clear errors
naming the file; GPT-2's layout as Hugging Face stores it: export then load
gives the same model, the prefix, mask buffers, tied head and half
precision (F16, BF16) are read, an untied head or a missing tensor is
refused, and GPT-2's head width is inferred."""
import dataclasses
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llm
from helpers import untrained

TEXT = ("The capital of France is Paris. The capital of Italy is Rome. "
        "Gold has the symbol Au. Iron has the symbol Fe. ") * 40
TOK = llm.Tokenizer.train(TEXT, 300)


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
    import hashlib                    # the checksum: of the whole file, with its own digits read as 0s
    checksum = header["__metadata__"]["checksum"]
    assert header["__metadata__"] == {"k": "v", "checksum": checksum}
    assert hashlib.sha256(raw.replace(checksum.encode(), b"0" * 64)).hexdigest() == checksum
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


def test_impossible_metadata_is_a_clear_error_at_once(tmp_path):
    """Found by test_fuzz: a config of 2**60 layers (the names of their
    tensors were being listed until memory ran out) and an RNG word out of
    range (numpy's OverflowError) are ValueErrors naming the file."""
    cfg, _ = small()
    tok = llm.byte_tokenizer()
    m = llm.GPT(llm.GPTConfig(**{**cfg.__dict__, "vocab_size": tok.vocab_size}))
    state = llm.TrainState(1, None, np.random.default_rng(0).bit_generator.state, [])
    llm.save_checkpoint(str(tmp_path / "c.safetensors"), m, tok, state)
    tensors, meta = llm.load_safetensors(str(tmp_path / "c.safetensors"))
    for key, edit, match in (("config", lambda d: d.update(n_layer=2**60), "n_layer=1152921504606846976"),
                             ("state", lambda d: d["rng_state"]["state"].update(inc=-1), "corrupt training state")):
        d = json.loads(meta[key])
        edit(d)
        bad = tmp_path / f"bad_{key}.safetensors"
        llm.save_safetensors(str(bad), tensors, {**meta, key: json.dumps(d)})
        with pytest.raises(ValueError, match=f"bad_{key}.safetensors.*{match}"):
            llm.load_checkpoint(str(bad))


# ---- GPT-2's layout -------------------------------------------------------------

def logits(model, text="The cat sat on the mat"):
    return model.forward(np.array([TOK.encode(text)]))[0]


def write_safetensors(path, tensors, dtypes=None):
    """A safetensors file written by hand, with raw bytes per tensor (BF16 too)."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        dtype = (dtypes or {}).get(name) or {np.float32: "F32", np.float16: "F16"}[arr.dtype.type]
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def to_bf16(a):
    """float32 -> bfloat16 words, rounding to nearest even."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def hf_tensors(model, prefix="transformer.", buffers=True):
    """Our weights as Hugging Face stores GPT-2: prefix, mask buffers, tied head."""
    t = {prefix + k: np.asarray(v, np.float32) for k, v in model.params.items()}
    T = model.config.block_size
    if buffers:
        for i in range(model.config.n_layer):
            t[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((1, 1, T, T), np.float32))
            t[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    t["lm_head.weight"] = t[prefix + "wte.weight"]
    return t


def test_export_then_load_gpt2_gives_the_same_model(tmp_path):
    model = untrained(TOK.vocab_size)
    llm.export_gpt2(model, str(tmp_path), TOK)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")} == \
        {"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 32, "vocab_size": TOK.vocab_size}
    tensors, _ = llm.load_safetensors(str(tmp_path / "model.safetensors"))
    assert "transformer.h.1.mlp.c_fc.weight" in tensors
    assert np.array_equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])
    loaded, tok = llm.load_gpt2(str(tmp_path))
    assert loaded.config == model.config
    assert tok.ranks == TOK.ranks and tok.special == TOK.special
    assert np.array_equal(logits(model), logits(loaded))


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_load_gpt2_reads_hugging_face_files(tmp_path, prefix):
    model = untrained(TOK.vocab_size)
    write_safetensors(str(tmp_path / "model.safetensors"), hf_tensors(model, prefix))
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2, "n_layer": 2}))
    loaded, tok = llm.load_gpt2(str(tmp_path / "model.safetensors"))
    assert tok is None                                   # no .tiktoken beside it
    assert loaded.config == model.config
    assert np.array_equal(logits(model), logits(loaded))
    os.remove(tmp_path / "config.json")                  # n_head as an argument instead
    assert llm.load_gpt2(str(tmp_path), n_head=2)[0].config.n_head == 2
    with pytest.raises(ValueError, match="n_head"):       # 16 wide: not GPT-2's 64 per head
        llm.load_gpt2(str(tmp_path))


def test_load_gpt2_refuses_an_untied_head_and_other_layouts(tmp_path):
    t = hf_tensors(untrained(TOK.vocab_size))
    t["lm_head.weight"] = t["lm_head.weight"] + 1
    write_safetensors(str(tmp_path / "model.safetensors"), t)
    with pytest.raises(ValueError, match="lm_head"):
        llm.load_gpt2(str(tmp_path), n_head=2)
    del t["lm_head.weight"], t["transformer.h.1.ln_2.bias"]
    write_safetensors(str(tmp_path / "model.safetensors"), t)
    with pytest.raises(ValueError, match="ln_2.bias"):
        llm.load_gpt2(str(tmp_path), n_head=2)


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_load_gpt2_widens_half_precision(tmp_path, kind):
    model = untrained(TOK.vocab_size)
    t = hf_tensors(model)
    if kind == "F16":
        write_safetensors(str(tmp_path / "model.safetensors"), {k: v.astype(np.float16) for k, v in t.items()})
    else:
        write_safetensors(str(tmp_path / "model.safetensors"), {k: to_bf16(v) for k, v in t.items()},
                          {k: "BF16" for k in t})
    loaded, _ = llm.load_gpt2(str(tmp_path), n_head=2)
    assert all(v.dtype == np.float32 for v in loaded.params.values())
    want, got = logits(model), logits(loaded)
    assert np.abs(want - got).max() < 0.05 * np.abs(want).max()
    assert np.array_equal(want.argmax(-1), got.argmax(-1)) or kind == "BF16"


def flat_wte(t):
    t["lm_head.weight"] = t["transformer.wte.weight"] = t["transformer.wte.weight"].reshape(-1)


@pytest.mark.parametrize("config,edit,match", [
    ("not JSON", None, "config.json"), ("[2]", None, "config.json"), ("[" * 100000 + "]" * 100000, None, "config.json"),
    ('{"n_head": 3}', None, "config.json: n_head"),                    # 16 wide: not a divisor
    ('{"n_head": 0}', None, "config.json: n_head"), ('{"n_head": "2"}', None, "config.json: n_head"),
    ('{"n_head": 2.5}', None, "config.json: n_head"),                  # int() made it 2
    ('{"n_head": 2}', flat_wte, "model.safetensors: .*wte"),             # "not enough values to unpack"
    ('{"n_head": 2}', lambda t: t.update({"transformer.wpe.weight": np.array(1.0, np.float32)}),
     "model.safetensors: .*wpe"),                                        # IndexError
], ids=["text", "list", "nested", "3-heads", "0-heads", "heads-text", "heads-float", "wte-1d", "wpe-0d"])
def test_load_gpt2_names_the_file_of_a_mistake(tmp_path, config, edit, match):
    t = hf_tensors(untrained(TOK.vocab_size))
    if edit:
        edit(t)
    write_safetensors(str(tmp_path / "model.safetensors"), t)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match=match):
        llm.load_gpt2(str(tmp_path))


@given(st.floats(width=32, allow_nan=False))
def test_bf16_is_the_top_half_of_float32(x):
    word = np.array([x], np.float32).view(np.uint32) >> 16
    assert llm.bf16_to_float32(word.astype(np.uint16))[0] == \
        (np.array([x], np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)[0]


def test_load_gpt2_infers_gpt2s_head_width(tmp_path):
    model = llm.GPT(llm.GPTConfig(n_layer=1, n_head=2, n_embd=128, block_size=8, vocab_size=TOK.vocab_size))
    write_safetensors(str(tmp_path / "model.safetensors"), hf_tensors(model))   # no config.json
    loaded, _ = llm.load_gpt2(str(tmp_path))
    assert loaded.config == model.config                  # 128 wide: 2 heads of 64


# ---- damaged and impossible files: a ValueError naming the file ------------------

def stepped_checkpoint(tmp_path, lora=False, name="c.safetensors"):
    """A checkpoint with a trained tokenizer and a training state whose
    optimizer has stepped (with LoRA: the adapters alone train) -> its path."""
    cfg, _ = small()
    m = llm.GPT(llm.GPTConfig(**{**cfg.__dict__, "vocab_size": TOK.vocab_size}))
    if lora:
        llm.add_lora(m, r=2)
    state = llm.TrainState(10, llm.AdamW(), np.random.default_rng(0).bit_generator.state, [(10, 2.0, None)])
    state.opt.step(m.params, {k: np.ones_like(v) for k, v in m.params.items() if k not in m.frozen})
    path = str(tmp_path / name)
    llm.save_checkpoint(path, m, TOK, state, stage="pretrain")
    return path


def parts(path):
    """A safetensors file -> (its header, as JSON, and its data bytes)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, header, data=b""):
    """A safetensors file of this header (a dict, or the bytes themselves) and data, no checksum added."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + data)


@pytest.mark.parametrize("old,new", [(b'\\"step\\": 10', b'\\"step\\": 11'),         # the training state
                                     (b'"optimizer.v.wte.weight"', b'"optimizer.v,wte.weight"'),
                                     (b'\\" symbol\\"', b'\\" symbox\\"'),               # a token's bytes
                                     (b'"checksum"', b'"checksun"')])                # the checksum's own key
def test_the_checksum_covers_the_whole_file(tmp_path, old, new):
    """It covered the tensor bytes alone: a header edited (here by hand, as a
    bit flip could) loaded, and resumed at the wrong step, or with zero
    moments for a tensor the file still held."""
    path = stepped_checkpoint(tmp_path)
    raw = open(path, "rb").read()
    if old == b'"checksum"' and old not in raw:             # (the key of before: still a key of the checksum)
        old, new = b'"sha256"', b'"sha257"'
    assert raw.count(old) == 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw.replace(old, new))
    with pytest.raises(ValueError, match="bad.safetensors"):
        llm.load_checkpoint(str(bad))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_bit_flipped_is_refused(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("flip")
    path = stepped_checkpoint(tmp, lora=True)
    raw = bytearray(open(path, "rb").read())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    (tmp / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad.safetensors"):
        llm.load_checkpoint(str(tmp / "bad.safetensors"))


def test_files_of_earlier_versions_load_and_a_checkpoint_without_a_checksum_is_refused(tmp_path):
    """Earlier versions' "sha256" covered the tensor bytes alone: such files
    load, checked as before. An llm checkpoint or adapter with no checksum at
    all is damaged; a foreign file (GPT-2's) without one is only warned of."""
    import hashlib
    path = stepped_checkpoint(tmp_path)
    header, data = parts(path)
    meta = header["__metadata__"]
    meta.pop("checksum", None)
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    write_raw(tmp_path / "old.safetensors", header, data)
    assert llm.load_checkpoint(str(tmp_path / "old.safetensors"))[2].step == 10
    write_raw(tmp_path / "old.safetensors", header, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="old.safetensors: corrupt"):
        llm.load_checkpoint(str(tmp_path / "old.safetensors"))
    del meta["sha256"]
    for fmt in ("llm-checkpoint-v1", "llm-lora-v1"):
        meta["format"] = fmt
        write_raw(tmp_path / "none.safetensors", header, data)
        with pytest.raises(ValueError, match="none.safetensors: no checksum"):
            llm.load_safetensors(str(tmp_path / "none.safetensors"))
    meta["format"] = "pt"
    write_raw(tmp_path / "foreign.safetensors", header, data)
    with pytest.warns(UserWarning, match="no checksum"):
        llm.load_safetensors(str(tmp_path / "foreign.safetensors"))


F32 = lambda shape, begin, end: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}  # noqa: E731


@pytest.mark.filterwarnings("ignore:.*no checksum")
@pytest.mark.parametrize("header,data,match", [
    (b"[" * 100000 + b"]" * 100000, b"", "bad header"),                        # was RecursionError
    ({"a": F32([0, 2**63], 0, 0)}, b"", "shape"),                               # numpy's errors, unnamed
    ({"a": F32([1] * 70, 0, 4)}, b"\0" * 4, "shape"),
    ({"a": F32([2], 0, 8), "b": F32([2], 4, 12)}, b"\0" * 12, "do not tile"),   # overlapping
    ({"a": F32([1], 0, 4), "b": F32([1], 8, 12)}, b"\0" * 12, "do not tile"),   # a gap
    ({"a": F32([1], 0, 4)}, b"\0" * 8, "do not tile"),                          # bytes after the last
    ({"__metadata__": [], "a": F32([1], 0, 4)}, b"\0" * 4, "__metadata__"),    # were taken for {}
    ({"__metadata__": "", "a": F32([1], 0, 4)}, b"\0" * 4, "__metadata__"),
    ({"__metadata__": 0, "a": F32([1], 0, 4)}, b"\0" * 4, "__metadata__"),
    ({"__metadata__": None, "a": F32([1], 0, 4)}, b"\0" * 4, "__metadata__"),
], ids=["nested", "2**63", "70-dims", "overlap", "gap", "after", "meta-list", "meta-str", "meta-0", "meta-null"])
def test_malformed_safetensors_headers_name_the_file(tmp_path, header, data, match):
    write_raw(tmp_path / "x.safetensors", header, data)
    with pytest.raises(ValueError, match=f"x.safetensors: .*{match}"):
        llm.load_safetensors(str(tmp_path / "x.safetensors"))


NESTED = "[" * 100000 + "]" * 100000


def drop(*names):
    return lambda t, m: [t.pop(n) for n in names]


def set_state(**changes):
    def edit(t, m):
        s = json.loads(m["state"])
        s["opt"].update(changes)
        m["state"] = json.dumps(s)
    return edit


def set_lora(value):
    def edit(t, m):
        lora = json.loads(m["lora"])
        m["lora"] = json.dumps(value(lora) if callable(value) else value)
    return edit


def first_adapter(lora):
    return next(iter(lora))


@pytest.mark.parametrize("lora,edit,match", [
    (False, lambda t, m: m.update(info=NESTED), "recursion"),                   # was RecursionError
    (False, lambda t, m: m.update(config=NESTED), "recursion"),
    (False, lambda t, m: m.update(tokenizer=llm.byte_tokenizer().to_json()), "vocab_size"),
    (False, lambda t, m: m.update(tokenizer=m["tokenizer"].replace('" symbol"', '" the"')), "ranks"),
    (False, drop("optimizer.v.wte.weight"), "optimizer"),                       # m without v
    (False, drop("optimizer.m.wte.weight", "optimizer.v.wte.weight"), "optimizer"),   # neither
    (False, lambda t, m: t.update({"optimizer.x.wte.weight": t.pop("optimizer.m.wte.weight")}), "optimizer.x"),
    (False, set_state(t=-1), "optimizer"),
    (False, lambda t, m: t.update({"wte.weight": t["wte.weight"].astype(np.float64)}),   # loaded as it was
     "tensor 'wte.weight' is float64"),
    (False, lambda t, m: t.update({"h.1.mlp.c_fc.weight": t["h.1.mlp.c_fc.weight"].astype(np.float16)}),
     "tensor 'h.1.mlp.c_fc.weight' is float16"),
    (False, lambda t, m: t.update({"optimizer.v.wpe.weight": t["optimizer.v.wpe.weight"].astype(np.float64)}),
     "tensor 'optimizer.v.wpe.weight' is float64"),
    (True, lambda t, m: t.update({"optimizer.m.wte.weight": t["wte.weight"],        # a frozen weight's
                                  "optimizer.v.wte.weight": t["wte.weight"]}), "optimizer"),
    (True, drop("h.0.attn.c_attn.lora_A", "h.0.attn.c_attn.lora_B",
                "optimizer.m.h.0.attn.c_attn.lora_A", "optimizer.v.h.0.attn.c_attn.lora_A",
                "optimizer.m.h.0.attn.c_attn.lora_B", "optimizer.v.h.0.attn.c_attn.lora_B"), "lora_A"),
    (True, set_lora(lambda d: {k: {**v, "dropout": 2.0} for k, v in d.items()}), "lora"),
    (True, set_lora([]), "lora"),
    (True, set_lora(lambda d: {k: {"r": 2} for k in d}), "lora"),
    (True, set_lora(lambda d: {**d, "wte": d[first_adapter(d)]}), "lora"),      # not a linear layer
    (True, lambda t, m: m.update(merged_lora=m["lora"]), "both merged and not"),
    (True, lambda t, m: m.update(merged_lora=json.dumps({"h.0.mlp.c_fc": {"r": 2}})), "lora"),
])
def test_impossible_checkpoints_are_refused_at_load(tmp_path, lora, edit, match):
    """Each was loaded (or failed later, or with a traceback): moments missing
    or for a frozen weight, a negative AdamW step, a tokenizer that does not
    fit the config, adapters without their tensors, a weight or a moment of
    another dtype than the config's."""
    tensors, meta = llm.load_safetensors(stepped_checkpoint(tmp_path, lora))
    edit(tensors, meta)
    bad = str(tmp_path / "bad.safetensors")
    llm.save_safetensors(bad, tensors, meta)
    with pytest.raises(ValueError, match=f"(?i)bad.safetensors: .*{match}"):
        llm.load_checkpoint(bad)


def test_a_checkpoint_whose_tokenizer_does_not_fit_its_model_is_not_written(tmp_path):
    cfg, _ = small()
    with pytest.raises(ValueError, match="tokenizer: has 260 ids; the model's vocab_size is 300"):
        llm.save_checkpoint(str(tmp_path / "c.safetensors"), llm.GPT(cfg), llm.byte_tokenizer())
    assert not os.listdir(tmp_path)


def test_resuming_needs_a_training_state(tmp_path):
    cfg, tc = small()
    m = llm.GPT(llm.GPTConfig(**{**cfg.__dict__, "vocab_size": TOK.vocab_size}))
    llm.save_checkpoint(str(tmp_path / "pretrain.safetensors"), m, TOK)        # no state: was AttributeError
    with pytest.raises(ValueError, match="pretrain.safetensors: .*training state"):
        llm.pretrain(TEXT, str(tmp_path), cfg, tc, resume=True)


def test_resuming_a_finished_run_keeps_its_figures(tmp_path):
    """No step runs: the figures are the run's, not 0 tokens/s in no time."""
    cfg, tc = small()
    first = llm.pretrain(TEXT, str(tmp_path), cfg, tc)
    assert llm.pretrain(TEXT, str(tmp_path), cfg, tc, resume=True) == first
    assert json.loads((tmp_path / "metrics.json").read_text()) == first


def test_atomic_write_leaves_nothing_when_it_fails_and_syncs_the_folder(tmp_path, monkeypatch):
    import stat
    path = str(tmp_path / "f.bin")
    with pytest.raises(TypeError):
        llm.atomic_write(path, "not bytes")                          # the write fails
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        llm.atomic_write(path, b"data")                               # the rename fails
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or fsync(fd))
    llm.atomic_write(path, b"data")
    assert open(path, "rb").read() == b"data"
    assert synced == [False, True] or os.name == "nt"                 # the file, then its folder


# ---- LoRA adapters: load_lora checks them against the model ----------------------

def adapter_file(tmp_path, cfg=None, name="a.safetensors"):
    m = llm.GPT(cfg or small()[0])
    llm.add_lora(m, r=2)
    llm.save_lora(str(tmp_path / name), m)
    return str(tmp_path / name)


def resaved(tmp_path, path, edit):
    tensors, meta = llm.load_safetensors(path)
    edit(tensors, meta)
    llm.save_safetensors(str(tmp_path / "bad.safetensors"), tensors, meta)
    return str(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("source,edit,match", [
    (dict(n_embd=32), None, "another model"),                                   # other widths
    (dict(n_layer=1), None, "another model"),                                   # h.1 left without
    (dict(n_embd=32), lambda t, m: m.pop("config", None), "lora_A"),                # a file of before: the shapes
    ({}, set_lora([]), "lora"),
    ({}, set_lora(lambda d: {k: {"r": 2} for k in d}), "lora"),
    ({}, set_lora(lambda d: {k: {**v, "dropout": 2.0} for k, v in d.items()}), "lora"),
    ({}, lambda t, m: m.pop("lora"), "lora"),                                   # was KeyError
    ({}, drop("h.1.mlp.c_fc.lora_B"), "h.1.mlp.c_fc.lora_B"),
    ({}, lambda t, m: t.update({"h.0.ln_1.lora_A": np.zeros((16, 2), np.float32)}), "h.0.ln_1.lora_A"),
])
def test_load_lora_checks_the_adapters_against_the_model(tmp_path, source, edit, match):
    """An adapter of another model loaded: unchecked shapes, or layers left
    without one (and frozen); malformed metadata, or tensors it does not list."""
    path = adapter_file(tmp_path, llm.GPTConfig(**{**small()[0].__dict__, **source}))
    if edit is not None:
        path = resaved(tmp_path, path, edit)
    with pytest.raises(ValueError, match=f"{os.path.basename(path)}: .*{match}"):
        llm.load_lora(path, llm.GPT(small()[0]))


def test_load_lora_refuses_a_model_whose_adapters_are_merged(tmp_path):
    m = llm.GPT(small()[0])
    llm.add_lora(m, r=2)
    llm.merge_lora(m)
    with pytest.raises(ValueError, match="merged"):                   # were applied twice
        llm.load_lora(adapter_file(tmp_path), m)
    m = llm.GPT(small()[0])
    llm.add_lora(m, r=2, targets=("mlp.c_fc",))
    with pytest.raises(ValueError, match="adapters already"):         # its own were left behind, unsaveable
        llm.load_lora(adapter_file(tmp_path), m)


def test_a_checkpoint_keeps_its_merged_adapters(tmp_path):
    """After fine-tuning the adapters are merged into the weights. The
    checkpoint records them as merged, with their tensors: unmerge_lora()
    gives the base model back after loading, and load_lora() of the same
    adapters is refused (it added them a second time). A training state
    saved after the merge loads too (its moments name the adapters)."""
    cfg, _ = small()
    m = llm.GPT(llm.GPTConfig(**{**cfg.__dict__, "vocab_size": TOK.vocab_size}))
    base = {k: v.copy() for k, v in m.params.items()}
    llm.add_lora(m, r=2)
    for k in m.params:
        if k.endswith(".lora_B"):
            m.params[k] += 0.5                                   # adapters that change the weights
    state = llm.TrainState(3, llm.AdamW(), None, [])
    state.opt.step(m.params, {k: np.ones_like(v) for k, v in m.params.items() if k not in m.frozen})
    llm.save_lora(str(tmp_path / "a.safetensors"), m)
    llm.merge_lora(m)
    path = str(tmp_path / "c.safetensors")
    llm.save_checkpoint(path, m, TOK, state, stage="finetune")
    m2, _, state2, _ = llm.load_checkpoint(path)
    assert m2.merged_lora == m.merged_lora and not m2.lora and state2.opt.t == 1
    for k, v in m.params.items():
        assert np.array_equal(m2.params[k], v), k
    with pytest.raises(ValueError, match="merged"):
        llm.load_lora(str(tmp_path / "a.safetensors"), m2)
    with pytest.raises(ValueError, match="every parameter is frozen"):      # (it trained nothing, silently)
        llm.train_steps(m2, llm.TrainState(), small()[1], lambda rng: None)
    llm.unmerge_lora(m2)
    for k, v in base.items():
        assert np.allclose(m2.params[k], v, atol=1e-6), k


def test_a_reward_model_trained_with_lora_loads_with_its_training_state(tmp_path):
    """Its score head trains beside the adapters: the file's moments name
    it, and the loaded model trains it too (the head was frozen at load)."""
    cfg, tc = small()
    m = llm.GPT(llm.GPTConfig(**{**cfg.__dict__, "vocab_size": TOK.vocab_size}))
    pairs = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}] * 4
    state = llm.train_reward_model(m, TOK, pairs, dataclasses.replace(tc, max_iters=2), lora=dict(r=2))
    path = str(tmp_path / "reward.safetensors")
    llm.save_checkpoint(path, m, TOK, state, stage="reward")
    m2, _, state2, _ = llm.load_checkpoint(path)
    assert m2.frozen == m.frozen == set(llm.param_shapes(cfg)) and {"score.weight", "h.0.mlp.c_fc.lora_A"} <= set(state2.opt.m)


def test_a_new_run_of_no_steps_does_not_take_an_old_runs_figures(tmp_path):
    cfg, tc = small()
    text = TEXT * 3
    llm.pretrain(text, str(tmp_path), cfg, tc)
    with pytest.raises(ValueError, match="max_iters"):       # (it returned the old run's metrics.json)
        llm.pretrain(text, str(tmp_path), cfg, dataclasses.replace(tc, max_iters=0, seed=9))
