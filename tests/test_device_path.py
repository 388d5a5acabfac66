"""llm.py's GPU path, run here on fakecupy: NumPy's arithmetic under CuPy's
rules (no implicit host <-> device conversion, no mixing), with CuPy's own
math instead of the CUDA kernels. fakecupy refuses what CuPy refuses;
training on the device gives what the CPU's NumPy path gives, to the last
bit (the same NumPy functions do the arithmetic), and its checkpoint loads
back onto the device; a training step copies its batch in and a few scalars
out, however deep the model; every stage of `train.py --quick --device
cuda` writes the CPU's report (timings aside); and bench.py's GPU benchmark
runs, with the emulated CUDA kernels and without."""
import json
import sys

import numpy as np
import pytest

import fakecupy
import llm
import train
from helpers import emulated_gpu, trained


@pytest.fixture
def fake_gpu(monkeypatch):
    backend = llm._chosen                                  # bench_cuda switches it; the next test gets it back
    yield emulated_gpu(monkeypatch, kernels=False)         # CuPy's own math, no CUDA kernels
    llm.use_device("cpu")
    if llm._chosen != backend:
        llm.set_backend(backend)


def test_the_fake_device_refuses_what_cupy_refuses():
    d = fakecupy.asarray(np.arange(6.0).reshape(2, 3))
    h = np.ones((2, 3))
    for bad in (lambda: np.asarray(d), lambda: d + h, lambda: h * d, lambda: h[:, fakecupy.asarray([0, 1])],
                lambda: d[np.array([0, 1])], lambda: np.concatenate([d, h]), lambda: round(d.sum(), 3),
                lambda: range(d.sum())):
        with pytest.raises(TypeError):
            bad()
    assert isinstance(d.sum(), fakecupy.ndarray) and float(d.sum()) == 15.0    # 0-d, as CuPy's
    assert isinstance(np.exp(d), fakecupy.ndarray) and isinstance(d.get(), np.ndarray)
    d += 1                                                                     # in place stays
    assert isinstance(d, fakecupy.ndarray) and d.get()[0, 0] == 1.0


def test_training_on_the_device_equals_the_cpu(fake_gpu, monkeypatch, tmp_path):
    cfg = llm.GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=260, dtype="float32")
    data = np.random.default_rng(0).integers(0, 53, 3000)
    tc = llm.TrainConfig(batch_size=4, max_iters=4, warmup_iters=2, eval_interval=1000)
    monkeypatch.setattr(llm, "_fastops", None)              # the CPU's NumPy path
    cpu_model, cpu_state = trained("cpu", cfg, tc, data)
    gpu_model, gpu_state = trained("cuda", cfg, tc, data)
    assert cpu_state.history == gpu_state.history
    for name, p in gpu_model.params.items():
        assert isinstance(p, fakecupy.ndarray), name
        np.testing.assert_array_equal(p.get(), cpu_model.params[name])
    path = str(tmp_path / "gpu.safetensors")
    llm.save_checkpoint(path, gpu_model, llm.byte_tokenizer())
    model, *_ = llm.load_checkpoint(path)
    for name, p in model.params.items():
        assert isinstance(p, fakecupy.ndarray) and (p == gpu_model.params[name]).all(), name


def test_a_training_step_copies_its_batch_in_and_a_few_scalars_out(fake_gpu):
    """However deep the model: no copy between host and GPU per operation."""
    data = np.random.default_rng(0).integers(0, 53, 3000)
    llm.use_device("cuda")
    counts = []
    for n_layer in (1, 3):
        cfg = llm.GPTConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=8, vocab_size=53)
        model, state = llm.GPT(cfg, seed=1), llm.TrainState()
        tc = llm.TrainConfig(batch_size=2, max_iters=3, warmup_iters=1, eval_interval=1000)
        fakecupy.transfers.update(to_device=0, to_host=0)
        llm.train_steps(model, state, tc, lambda r: llm.get_batch(data, 8, 2, r), stop_at=1)
        counts.append(dict(fakecupy.transfers))
    assert counts[0] == counts[1] and counts[0]["to_device"] == 2 and counts[0]["to_host"] <= 8


def untimed(report):
    """A report without its timings (seconds, tokens per second)."""
    if isinstance(report, dict):
        return {k: untimed(v) for k, v in report.items() if "second" not in k}
    return report


def test_every_stage_of_train_py_runs_on_the_device(fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(llm, "_fastops", None)
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        train.main(["--quick", "--device", device, "--out", str(out)])
        reports[device] = untimed(json.load(open(out / "report.json")))
    assert reports["cuda"] == reports["cpu"]


@pytest.mark.parametrize("kernels", [False, True])
def test_the_gpu_benchmark_runs_on_the_device(fake_gpu, monkeypatch, capsys, kernels):
    """With fastops' CUDA kernels (emulated, as test_cuda.py runs them) and without."""
    import bench
    if kernels:
        emulated_gpu(monkeypatch)
        llm.use_device("cuda")
    tiny = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=19)
    monkeypatch.setattr(bench, "GPU_MODELS", {"tiny": (tiny, 2)})
    monkeypatch.setitem(sys.modules, "torch", None)         # PyTorch absent: no comparison
    bench.bench_cuda(steps=1)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tiny_llm_cupy_tok_s"] > 0 and ("tiny_llm_cuda_tok_s" in result) == kernels
    ops = {k: v for k, v in result.items() if k.startswith("tiny_op ")}
    assert len(ops) == 6                                    # 5 linear layers, attention
    assert all(set(v) == ({"fastops", "cupy"} if kernels else {"cupy"}) for v in ops.values())



def stand_in_torch(monkeypatch, gpu=True):
    """torch as bench_cuda uses it, with no optimizers of its own; its model,
    batch and step bench's stand-ins. -> the steps taken, each its arguments."""
    import types
    import bench
    steps = []
    torch = types.SimpleNamespace(__version__="stand-in", backends=types.SimpleNamespace(
        cuda=types.SimpleNamespace(matmul=types.SimpleNamespace()), cudnn=types.SimpleNamespace()),
        cuda=types.SimpleNamespace(is_available=lambda: gpu, synchronize=lambda: None, empty_cache=lambda: None))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(bench, "GPU_MODELS", {"tiny": (dict(n_layer=1, n_head=2, n_embd=16, block_size=8,
                                                            vocab_size=19), 2)})
    monkeypatch.setattr(bench, "torch_gpt2", lambda cfg, device: ("model", device))
    monkeypatch.setattr(bench, "torch_batch", lambda cfg, batch, device: (("idx", device), ("tgt", device)))
    monkeypatch.setattr(bench, "torch_train_step", lambda *args: lambda: steps.append(args))
    return steps


def test_the_gpu_benchmark_trains_pytorch_with_the_cpus_step(fake_gpu, monkeypatch, capsys):
    """PyTorch's GPU step is bench.torch_train_step, the CPU worker's, on its
    model and batch on the device (test_bench.py checks that step against llm's)."""
    import bench
    steps = stand_in_torch(monkeypatch)
    bench.bench_cuda(steps=1)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["torch"] == "stand-in" and result["tiny_torch_tok_s"] > 0 and "tiny_llm_cupy_vs_torch" in result
    assert steps and set(steps) == {(("model", "cuda"), ("idx", "cuda"), ("tgt", "cuda"))}


@pytest.mark.parametrize("argv, gpu, said", [(["--no-torch"], True, "skipped (--no-torch)"),
                                             ([], False, "PyTorch stand-in here cannot use the GPU")])
def test_the_gpu_benchmark_without_pytorch(fake_gpu, monkeypatch, capsys, argv, gpu, said):
    """--no-torch holds on the GPU too, and a PyTorch that cannot use the GPU is said, not a traceback."""
    import bench
    steps = stand_in_torch(monkeypatch, gpu)
    bench.main(["--device", "cuda", "--quick"] + argv)
    out = capsys.readouterr().out.strip().splitlines()
    assert f"# no PyTorch comparison: {said}" in out and not steps and "torch" not in json.loads(out[-1])
