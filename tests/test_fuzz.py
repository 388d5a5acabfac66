"""Damaged files and hand-made arrays never crash Python: hypothesis mutates
a checkpoint (bit flips, truncations, header and metadata edits) and
load_checkpoint answers with ValueError and nothing else; it hands the C
kernels wrong arrays and they answer with TypeError or ValueError. Both run
in a subprocess, so a crash of the interpreter would show as a failure.
And a run killed while it writes checkpoints loses nothing: the file is
whole or absent, the leftovers go, and resuming ends with the weights of a
run never killed."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, timeout=600):
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-3000:])


CHECKPOINT_FUZZ = r'''
import hashlib, json, os, struct, tempfile, warnings
import numpy as np
from hypothesis import given, settings, strategies as st, HealthCheck
import llm
warnings.simplefilter("ignore")
cfg = llm.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=260)
model = llm.GPT(cfg)
llm.add_lora(model, r=2)
state = llm.TrainState(3, llm.AdamW(), np.random.default_rng(0).bit_generator.state, [(1, 2.0, None)])
state.opt.step(model.params, {k: np.ones_like(v) for k, v in model.params.items() if k not in model.frozen})
folder = tempfile.mkdtemp()
path = os.path.join(folder, "c.safetensors")
llm.save_checkpoint(path, model, llm.byte_tokenizer(), state, stage="x")
GOOD = open(path, "rb").read()
n = struct.unpack("<Q", GOOD[:8])[0]
HEADER, DATA = json.loads(GOOD[8:8 + n]), GOOD[8 + n:]
values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                      max_leaves=6)

def nodes(x, path=()):
    yield path
    for k, v in (x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()):
        yield from nodes(v, path + (k,))

@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def fuzz(data):
    kind = data.draw(st.sampled_from(["flip", "truncate", "header", "metadata"]))
    if kind == "flip":
        raw = bytearray(GOOD)
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        raw = bytes(raw)
    elif kind == "truncate":
        raw = GOOD[:data.draw(st.integers(0, len(GOOD) - 1))]
    else:
        header = json.loads(json.dumps(HEADER))
        if kind == "metadata":      # inside the JSON that the metadata strings hold
            meta = header["__metadata__"]
            key = data.draw(st.sampled_from(sorted(k for k in meta if k not in ("format", "checksum"))))
            inner = json.loads(meta[key])
            target = inner
        else:
            target = header
        path = data.draw(st.sampled_from(list(nodes(target))))
        value = data.draw(values)
        if path:
            node = target
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
        elif kind == "metadata":
            inner = value
        else:
            header = value
        if kind == "metadata":
            meta[key] = json.dumps(inner)
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        signed = isinstance(meta, dict) and "checksum" in meta and data.draw(st.booleans())
        if signed:                  # a checksum made for the edited file, as save_safetensors makes it
            meta["checksum"] = "0" * 64
        head = json.dumps(header).encode()
        raw = struct.pack("<Q", len(head)) + head + DATA
        if signed:                  # so the checks behind the checksum are reached
            raw = raw.replace(b"0" * 64, hashlib.sha256(raw).hexdigest().encode(), 1)
    with open(path_bad, "wb") as f:
        f.write(raw)
    try:
        llm.load_checkpoint(path_bad)
    except ValueError:
        pass

path_bad = os.path.join(folder, "bad.safetensors")
fuzz()
print("ok")
'''


def test_damaged_checkpoints_are_value_errors_never_crashes():
    run_python(CHECKPOINT_FUZZ)


KERNEL_FUZZ = r'''
import numpy as np
from hypothesis import given, settings, strategies as st, HealthCheck
import llm
assert llm._fastops is not None
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)
arrays = st.one_of(
    st.tuples(shapes, st.sampled_from([np.float32, np.float64, np.int64, np.float16]), st.booleans()).map(
        lambda t: (np.ones(t[0], t[1]) if not t[2] else np.ones(t[0] + (2,), t[1])[..., 0])),
    st.just(None), st.just([1.0, 2.0]), st.just(3.0))
KERNELS = [(llm.fo_linear_forward, 3), (llm.fo_linear_backward, 3), (llm.fo_linear_backward_input, 2),
           (llm.fo_attention_forward, 3), (llm.fo_attention_backward, 6), (llm.fo_gelu_forward, 1),
           (llm.fo_gelu_backward, 2), (llm.fo_layernorm_forward, 3), (llm.fo_layernorm_backward, 5)]

@settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "300")), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.sampled_from(KERNELS), st.data())
def fuzz(kernel, data):
    f, n = kernel
    args = [data.draw(arrays) for _ in range(n)]
    if data.draw(st.booleans()):        # often the right rank and dtype, the shapes still wrong
        args = [np.ones(data.draw(st.lists(st.integers(1, 4), min_size=a.ndim, max_size=a.ndim)), np.float32)
                if isinstance(a, np.ndarray) and a.ndim else a for a in args]
    try:
        f(*args)
    except (TypeError, ValueError):
        pass

fuzz()
print("ok")
'''


def test_wrong_arrays_never_reach_the_c_kernels():
    if llm._fastops is None:
        pytest.skip("fastops is not built")
    run_python(KERNEL_FUZZ)


WRITER = r'''
import sys, numpy as np, llm
m = llm.GPT(llm.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=260))
i = 0
while True:
    i += 1
    for v in m.params.values():
        v[...] = i
    llm.save_checkpoint(sys.argv[1], m, llm.byte_tokenizer(), stage=str(i))
'''


def test_a_kill_during_checkpoint_writes_leaves_the_file_whole_or_absent(tmp_path):
    path = str(tmp_path / "c.safetensors")
    rnd = random.Random(0)
    for attempt in range(6):
        if os.path.exists(path):
            os.remove(path)
        p = subprocess.Popen([sys.executable, "-c", WRITER, path], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        deadline = time.time() + 120
        while not os.path.exists(path) and time.time() < deadline and p.poll() is None:
            time.sleep(0.01)                     # killed amid the writes, not before the first one
        time.sleep(rnd.random() / 2)
        p.send_signal(signal.SIGKILL)
        p.wait()
        model, _, _, info = llm.load_checkpoint(path)       # the last whole one: every value its own write's
        assert all((v == float(info["stage"])).all() for v in model.params.values())
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    m = llm.GPT(llm.GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=260))
    llm.save_checkpoint(path, m, llm.byte_tokenizer())
    assert os.listdir(tmp_path) == ["c.safetensors"], (leftovers, os.listdir(tmp_path))


def test_a_killed_pretraining_resumes_to_the_weights_of_a_run_never_killed(tmp_path):
    args = ["pretrain", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
            "--vocab-size", "260", "--batch-size", "2", "--max-iters", "60", "--eval-interval", "3",
            "--eval-iters", "1", "--dropout", "0.1"]
    train = [sys.executable, os.path.join(ROOT, "train.py")]
    subprocess.run(train + args + ["--out", str(tmp_path / "whole")], check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    for wait in (1.5, 1.0):
        p = subprocess.Popen(train + args + ["--resume", "--out", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (out / "pretrain.safetensors").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(wait)
        p.send_signal(signal.SIGKILL)
        p.wait()
    subprocess.run(train + args + ["--resume", "--out", str(out)], check=True, capture_output=True, timeout=600)
    a, _, sa, _ = llm.load_checkpoint(str(tmp_path / "whole" / "pretrain.safetensors"))
    b, _, sb, _ = llm.load_checkpoint(str(out / "pretrain.safetensors"))
    assert sa.step == sb.step == 60 and sa.history == sb.history
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
