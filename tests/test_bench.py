"""bench.py compares like with like and answers a user's mistake before
measuring: PyTorch's training step is llm's (clip, AdamW's settings) on the
CPU and the GPU alike; a bad --torch-python or contradictory flags end the
run at once in one line; a PyTorch worker that dies mid-run costs the
PyTorch figures, not the headline; the headline's figures are PyTorch's time
over llm's, each side's step the median over all its alternated rounds,
null without torch, no worker with --no-torch; the worker's stray prints
stay off its answers. The measurements are stubbed: speed is measured only
in bench.py itself."""
import json
import sys
import types

import numpy as np
import pytest

import bench
import llm

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=19)


def test_pytorch_training_step_is_llms():
    """Three steps from the same weights and batch give the same weights:
    the same clipping and AdamW (betas, decay on matrices only) on both sides."""
    torch = pytest.importorskip("torch")
    model = llm.GPT(llm.GPTConfig(**TINY, dtype="float64"), seed=0)   # float64: Adam magnifies the
    tm = bench.torch_gpt2(TINY, "cpu").double()                        # rounding of near-zero gradients
    ours = {"wte.weight": tm.wte.weight, "wpe.weight": tm.wpe.weight, "ln_f.weight": tm.ln_f.weight,
            "ln_f.bias": tm.ln_f.bias}
    for name, p in tm.h[0].named_parameters():           # llm's (in, out) matrices are nn.Linear's transposed
        theirs = {"c_attn": "attn.c_attn", "c_proj": "attn.c_proj", "c_fc": "mlp.c_fc",
                  "mlp_proj": "mlp.c_proj"}.get(name.split(".")[0], name.split(".")[0])
        ours[f"h.0.{theirs}.{name.split('.')[1]}"] = p
    assert ours.keys() == model.params.keys()
    as_llm = lambda name, a: a.T if name.startswith("h.") and a.ndim == 2 else a
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(torch.from_numpy(as_llm(name, model.params[name]).copy()))
    rng = np.random.default_rng(0)
    idx, tgt = (rng.integers(0, TINY["vocab_size"], (2, TINY["block_size"])) for _ in range(2))
    step, opt = bench.torch_train_step(tm, torch.from_numpy(idx), torch.from_numpy(tgt), lr=1e-2), llm.AdamW(lr=1e-2)
    for _ in range(3):
        step()
        bench.train_step(model, opt, idx, tgt)
    for name, p in ours.items():
        np.testing.assert_allclose(as_llm(name, p.detach().numpy()), model.params[name],
                                   rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.fixture
def measured(monkeypatch):
    """bench.main's measurements replaced by stand-ins that answer at once.
    -> the names of those called, in order."""
    if llm._fastops is None:
        pytest.skip("bench.py needs fastops")
    called = []

    def stub(owner, name, value):
        monkeypatch.setattr(owner, name, lambda *a, **kw: called.append(name) or value)
    stub(bench, "fma_peak_gflops", 100.0)
    monkeypatch.setattr(llm, "_CHOICE", llm._CHOICE)               # main sets it back to the stand-in's
    stub(llm, "kernel_choice", {"linear": {"fastops": 1e-3, "numpy": 2e-3, "use": True}})
    stub(bench, "bench_matmul", [("x", 1e9, 2.0, 1.0)])
    stub(bench, "bench_matmul_generation", [(1, 1e9, 1e9, 2.0, 1.0)])
    stub(bench, "bench_attention", [(1, 6, 256, 64, {"numpy": (2.0, 1e6), "fastops": (1.0, 1e5)})])
    stub(bench, "bench_train", {(n, b): 1.0 for n in bench.MODELS for b in ("numpy", "auto", "fastops")})
    stub(bench, "bench_amx", ([], {}))
    stub(bench, "profile_step", ({"linear_forward": 1.0, "linear_backward": 1.0}, 3.0))
    stub(bench, "matmul_cases", [("x", 1.0, lambda: None, lambda: None)])    # PyTorch's section: llm's side
    monkeypatch.setattr(bench, "settle", lambda: None)
    return called


def fake_python(tmp_path, worker):
    """An executable to pass as --torch-python: runs the Python source
    `worker` (with this interpreter) in place of bench.py --torch-worker."""
    (tmp_path / "worker.py").write_text(worker)
    exe = tmp_path / "python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "worker.py"}"\n')
    exe.chmod(0o755)
    return str(exe)


NO_NUMPY = "import sys\nsys.exit('Traceback (most recent call last):\\nModuleNotFoundError: No module named numpy')\n"


@pytest.mark.parametrize("python, said", [("/nonexistent/python", "No such file or directory"),
                                          ("no numpy", "ModuleNotFoundError: No module named numpy")])
def test_a_bad_torch_python_ends_the_run_before_any_measurement(measured, tmp_path, python, said):
    python = fake_python(tmp_path, NO_NUMPY) if python == "no numpy" else python
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--torch-python", python])
    assert measured == []
    line = e.value.code
    assert line.startswith(f"bench.py --torch-python {python}: expected a Python with torch and numpy;"
                           " its worker said: ") and said in line and "\n" not in line


HELLO_THEN_DIE = """import json, sys
sys.stdin.readline()
print(json.dumps({"torch": "2.x", "threads": 2, "omp_wait_policy": None, "transformers": None}), flush=True)
sys.stdin.readline()
sys.exit("RuntimeError: the worker fell over")
"""


def test_a_worker_that_dies_mid_run_costs_only_the_pytorch_figures(measured, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--torch-python", fake_python(tmp_path, HELLO_THEN_DIE)])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert "bench_train" in measured and result["train_step_vs_numpy_small"] == 1.0
    assert all(v is None for k, v in result.items() if "pytorch" in k and k != "pytorch")
    note = "the PyTorch worker died mid-run (exit status 1, its error above): the PyTorch figures are null"
    assert result["pytorch"] == note and e.value.code == f"bench.py: {note}"
    assert "RuntimeError: the worker fell over" in err                  # its own words, relayed


def test_without_torch_the_rest_runs(measured, monkeypatch, capsys):
    monkeypatch.setattr(bench, "find_torch_python", lambda arg: None)
    bench.main(["--quick"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pytorch"].startswith("torch is not importable here") and result["matmul_vs_pytorch_small"] is None


@pytest.mark.parametrize("argv, flag", [("--mpi --device cuda", "--mpi"), ("--no-torch --torch-python p", "--no-torch"),
                                        ("--mpi --torch-python p", "--mpi"),
                                        ("--device cuda --torch-python p", "--device cuda")])
def test_contradictory_flags_are_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv.split())
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and ": error: " in last and flag in last


# ---- the figures: PyTorch's time over llm's, medians over rounds (a stand-in worker) ----
INFO = {"torch": "2.x", "threads": 2, "omp_wait_policy": None, "transformers": None}


def test_the_pytorch_figures_are_pytorch_time_over_llm_time(measured, monkeypatch, capsys):
    pt = {"info": INFO, ("matmul", "small"): 1.5, ("matmul", "large"): 2.5,
          ("train", "small", "torch"): 4.0, ("train", "small", "llm"): 2.0,
          ("train", "large", "torch"): 3.0, ("train", "large", "llm"): 6.0,
          ("gen", 1, "llm"): 1.0, ("gen", 1, "torch"): 2.0, ("gen", 1, "hf"): 3.0,
          ("gen", 16, "llm"): 4.0, ("gen", 16, "torch"): 2.0, "gen_limit": 1.25}
    monkeypatch.setattr(bench, "find_torch_python", lambda arg: "python")
    monkeypatch.setattr(bench, "TorchWorker", lambda python: types.SimpleNamespace(info=INFO))
    monkeypatch.setattr(bench, "bench_vs_torch", lambda quick, worker: pt)
    bench.main(["--quick"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: result[k] for k in result if "pytorch" in k and k != "pytorch"} == {
        "matmul_vs_pytorch_small": 1.5, "matmul_vs_pytorch_large": 2.5, "train_step_vs_pytorch_small": 2.0,
        "train_step_vs_pytorch_large": 0.5, "generate_vs_pytorch_b1": 2.0, "generate_vs_pytorch_b1_limit": 1.25,
        "generate_vs_pytorch_b16": 0.5}
    assert result["generate_tok_s_b1"] == {"llm": 48.0, "torch": 24.0, "hf": 16.0}
    assert result["pytorch"].startswith("torch 2.x, 2 threads")


def test_without_torch_every_pytorch_key_is_null(measured, monkeypatch, capsys):
    monkeypatch.setattr(bench, "find_torch_python", lambda arg: None)
    bench.main(["--quick"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k for k in result if "pytorch" in k and k != "pytorch"} == {
        "matmul_vs_pytorch_small", "matmul_vs_pytorch_large", "train_step_vs_pytorch_small",
        "train_step_vs_pytorch_large", "generate_vs_pytorch_b1", "generate_vs_pytorch_b1_limit",
        "generate_vs_pytorch_b16"}
    assert all(result[k] is None for k in result if "pytorch" in k and k != "pytorch")


def test_no_torch_starts_no_worker(measured, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(bench, "find_torch_python", lambda arg: "python")
    monkeypatch.setattr(bench, "TorchWorker", lambda python: started.append(python))
    bench.main(["--quick", "--no-torch"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert started == [] and result["pytorch"] == "skipped (--no-torch)"


def test_the_matmul_table_s_gflops(measured, capsys):
    bench.main(["--quick", "--no-torch"])
    row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("x "))
    assert row.split() == ["x", "0.5", "1.0", "2.00", "1%"]       # 1e9 flops: numpy 2 s, fastops 1 s, peak 100


def test_pytorch_step_figures_are_medians_over_alternated_rounds(monkeypatch, capsys):
    """Each side's step time is the median of all its rounds' steps, PyTorch's over llm's."""
    calls = {}

    class Worker:
        info = INFO

        def ask(self, cmd, **kw):
            if cmd == "matmul":
                return {"times": [2.0]}
            if cmd == "train":
                k = calls[kw["model"]] = calls.get(kw["model"], 0) + 1
                return {"times": [float(k)] * kw["steps"]}            # rounds of 1 s, 2 s, 3 s
            raise bench.WorkerFailed("stop before generation")

        def close(self):
            pass
    monkeypatch.setattr(bench, "settle", lambda: None)
    monkeypatch.setattr(bench, "matmul_cases", lambda name: [("x", 1e9, None, lambda: None)])
    monkeypatch.setattr(bench, "best_of", lambda f, reps, warm=1: 1.0)
    monkeypatch.setattr(bench, "make_model", lambda name: (None,) * 4)
    monkeypatch.setattr(bench, "train_step", lambda *a: None)
    monkeypatch.setattr(bench, "step_times", lambda model, opt, idx, tgt, steps: [1.0] * steps)
    monkeypatch.setattr(llm, "GPT", lambda *a, **kw: None)
    monkeypatch.setattr(llm, "generate", lambda *a, **kw: iter(()))
    with pytest.raises(bench.WorkerFailed):
        bench.bench_vs_torch(False, Worker())
    out = capsys.readouterr().out
    assert "small products, total time: PyTorch / llm = 2.00" in out
    assert "small  step: llm   1000.0 ms, PyTorch   2000.0 ms: PyTorch / llm = 2.00 (its rounds: 1.00, 2.00, 3.00)" in out, out


def test_the_worker_s_stray_prints_do_not_break_its_answers(monkeypatch):
    import io
    fake = types.SimpleNamespace(__version__="9.9", manual_seed=lambda s: None,
                                 get_num_threads=lambda: print("a stray line") or 3)
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setitem(sys.modules, "transformers", None)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"cmd": "hello"}\n{"cmd": "quit"}\n'))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    bench.torch_worker()
    assert [json.loads(l) for l in out.getvalue().splitlines()] == [
        {"torch": "9.9", "threads": 3, "omp_wait_policy": bench.os.environ.get("OMP_WAIT_POLICY"), "transformers": None}]
    assert "a stray line" in err.getvalue()
