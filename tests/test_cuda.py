"""fastops' CUDA kernels (fastops.c's __CUDACC__ section) and llm.py on the GPU.

- Without a GPU: use_device checks its argument and, without CuPy, says what
  to install; nvcc compiles fastops.c as CUDA and the library opens with cffi
  and reports errors as messages (skipped without nvcc); built kernels whose
  CUDA runtime cannot start make llm.py warn and use CuPy's math; the CUDA
  build without nvcc is not an error.
- The GPU tests: the CUDA kernels through llm.py (linear, attention, GELU,
  LayerNorm) against float64 references, forward and backward, on fixed
  shapes and on shapes hypothesis picks, and five training steps on the GPU
  against the same steps on the CPU, with the checkpoint they save loading
  back unchanged. Each runs twice: on a real GPU (CuPy; skipped without one,
  a failure with LLM_REQUIRE_GPU=1) and on the GPU emulated on the CPU
  (helpers.emulated_gpu: fakecupy with the CUDA kernels compiled for the CPU).
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import build_ext
import llm
from helpers import (ROOT, attention_reference, close, close_to_linear, emulated_gpu,
                     gelu_reference, layernorm_reference, randn, trained)

LIB = os.path.join(ROOT, build_ext.CUDA_LIB)


def _nvcc():
    return os.environ.get("NVCC") or shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


# ---- without a GPU ------------------------------------------------------------------

def test_use_device_checks_its_argument():
    with pytest.raises(ValueError, match="cpu' or 'cuda"):
        llm.use_device("tpu")
    assert llm.xp is np


def test_use_device_cuda_without_cupy_says_what_to_install():
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="CuPy"):
        llm.use_device("cuda")
    assert llm.xp is np                                # nothing changed


def test_cuda_build_compiles_and_loads(tmp_path):
    """nvcc compiles fastops.c as CUDA; the library opens without a GPU and
    reports errors as messages (no GPU here: the sync fails, with a message)."""
    if _nvcc() is None:
        pytest.skip("nvcc is absent")
    src = os.path.join(ROOT, "fastops.c")
    if os.path.exists(LIB) and os.path.getmtime(LIB) >= os.path.getmtime(src):
        path = LIB                                     # already built from this source
    else:
        path = str(tmp_path / build_ext.CUDA_LIB)
        assert build_ext.build_cuda(verbose=False, dest=path) == 0
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(build_ext.CUDA_CDEF)
    lib = ffi.dlopen(path)
    assert ffi.string(lib.fo_isa()) == b"cuda"
    assert lib.fo_cuda_error() == ffi.NULL
    lib.fo_attention_forward(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, 1, 1, 4, 129,
                             *(4 * 129, 4 * 129, 129) * 2)             # packed heads
    msg = lib.fo_cuda_error()
    assert msg != ffi.NULL and b"head size 129" in ffi.string(msg)
    assert lib.fo_cuda_error() == ffi.NULL             # reading the error clears it


def test_cuda_kernels_that_cannot_run_fall_back_to_cupy_with_a_warning():
    """Here the built library loads but its CUDA runtime cannot start (no
    GPU; on a GPU machine, a driver older than the nvcc that built it):
    llm.py says so and uses CuPy's math instead of failing on every call."""
    if not os.path.exists(LIB):
        pytest.skip("the CUDA kernels are not built")
    with pytest.warns(UserWarning, match="cannot run here"):
        assert llm._load_cuda() is None


def test_cuda_build_without_nvcc_is_not_an_error():
    env = {**os.environ, "PATH": os.path.dirname(sys.executable), "NVCC": "",
           "CUDA_HOME": "/nonexistent"}
    code = ("import build_ext, os; os.path.exists = lambda p: False; "
            "import sys; sys.exit(build_ext.main(['--cuda']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "nvcc not found" in r.stdout


# ---- on the GPU -------------------------------------------------------------------------

def real_gpu():
    """CuPy and a GPU with fastops' CUDA kernels, or a skip (a failure with
    LLM_REQUIRE_GPU=1, for a run on a GPU machine)."""
    absent = pytest.fail if os.environ.get("LLM_REQUIRE_GPU") == "1" else pytest.skip
    try:
        import cupy as cp
    except ImportError as e:
        absent(f"could not import cupy ({e})")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            absent("no GPU")
    except Exception as e:
        absent(f"no GPU ({e})")
    if not os.path.exists(LIB):
        if _nvcc() is None or build_ext.build_cuda(verbose=False) != 0:
            absent("the CUDA kernels are not built (python build_ext.py --cuda)")
    llm.use_device("cuda")
    if llm._cuda is None:
        llm.use_device("cpu")
        absent("the CUDA kernels cannot run here (see the warning)")
    return cp


@pytest.fixture(params=["cuda", "emulated"])
def gpu(request, monkeypatch):
    """llm on the GPU with the CUDA kernels, back on the CPU afterwards: on a
    real GPU, and emulated on the CPU. -> the array module (CuPy or fakecupy)."""
    if request.param == "cuda":
        cp = real_gpu()
    else:
        cp = emulated_gpu(monkeypatch)
        llm.use_device("cuda")
    previous = llm.set_backend("fastops")
    try:
        yield cp
    finally:
        llm.use_device("cpu")
        llm.set_backend(previous)          # (the CPU's: without fastops built, 'fastops' is refused there)


def at_scale(gpu, work):
    """The largest shapes are for a real GPU: emulated, they would take seconds."""
    if gpu.__name__ == "fakecupy" and work > 1e8:
        pytest.skip("real-GPU scale: too slow to emulate")


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 5, 7), (128, 128, 128), (129, 65, 257),
                                   (768, 128, 384), (2048, 384, 1152), (64, 1000, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_linear_matches_float64(gpu, M, K, N, bias):
    at_scale(gpu, M * K * N)
    rng = np.random.default_rng(M * 7 + K * 3 + N)
    x, w, dy = (randn(rng, *s) for s in ((M, K), (K, N), (M, N)))
    b = randn(rng, N) if bias else None
    g = [gpu.asarray(a) if a is not None else None for a in (x, w, dy, b)]
    y = llm.fo_linear_forward(g[0], g[1], g[3])
    dx, dw, db = llm.fo_linear_backward(g[2], g[0], g[1])
    assert isinstance(y, gpu.ndarray) and y.dtype == np.float32
    close_to_linear(x, w, b, dy, y, dx, dw, db)
    # the tied output head passes a transposed view (F-ordered): same results
    wt = gpu.asarray(np.ascontiguousarray(w.T))
    close_to_linear(x, w, None, dy, llm.fo_linear_forward(g[0], wt.T, None),
                    llm.fo_linear_backward(g[2], g[0], wt.T)[0], None, None)


@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 8), (2, 3, 5, 16), (1, 2, 64, 32), (2, 2, 65, 64),
                                     (1, 1, 130, 33), (1, 2, 257, 64), (1, 1, 100, 128),
                                     (2, 4, 64, 32), (1, 12, 1024, 64)])
def test_cuda_attention_matches_float64(gpu, B, H, T, D):
    at_scale(gpu, B * H * T * T * D)
    rng = np.random.default_rng(T * 10 + D)
    q, k, v, dy = (randn(rng, B, H, T, D) for _ in range(4))
    ref_y, _, *ref = attention_reference(q, k, v, dy)
    y, cache = llm.ops.attention_forward(*(gpu.asarray(a) for a in (q, k, v)))
    assert isinstance(cache, llm._Kernel)              # the CUDA kernel ran
    grads = llm.ops.attention_backward(gpu.asarray(dy), cache)
    close(y, ref_y, T)
    for got, want in zip(grads, ref):
        close(got, want, T * D)


@pytest.mark.parametrize("M,C", [(1, 1), (9, 33), (8192, 768), (5, 1600)])
def test_cuda_gelu_and_layernorm_match_float64(gpu, M, C):
    at_scale(gpu, M * C * 100)
    rng = np.random.default_rng(M + C)
    x, w, b, dy = (randn(rng, *s) for s in ((M, C), (C,), (C,), (M, C)))
    gelu_y, gelu_dx = gelu_reference(x, dy)
    ln_y, _, _, *ln_grads = layernorm_reference(x, w, b, dy)
    y, cache = llm.ops.gelu_forward(gpu.asarray(x))
    assert isinstance(cache, llm._Kernel)              # the CUDA kernel ran
    close(y, gelu_y, 1)
    close(llm.ops.gelu_backward(gpu.asarray(dy), cache), gelu_dx, 1)
    y, cache = llm.ops.layernorm_forward(*(gpu.asarray(a) for a in (x, w, b)))
    assert isinstance(cache, llm._Kernel)
    close(y, ln_y, C)
    for got, want, K in zip(llm.ops.layernorm_backward(gpu.asarray(dy), cache), ln_grads, (C, M, M)):
        close(got, want, K)


ANY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@ANY
@given(M=st.integers(1, 300), K=st.integers(1, 300), N=st.integers(1, 300), bias=st.booleans())
def test_cuda_linear_any_shape(gpu, M, K, N, bias):
    test_cuda_linear_matches_float64(gpu, M, K, N, bias)


@ANY
@given(B=st.integers(1, 3), H=st.integers(1, 4), T=st.integers(1, 200), D=st.integers(1, 128))
def test_cuda_attention_any_shape(gpu, B, H, T, D):
    test_cuda_attention_matches_float64(gpu, B, H, T, D)


def test_cuda_training_matches_cpu(gpu, tmp_path):
    """The same steps, from the same weights and batches, on both devices."""
    cfg = llm.GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=260, dtype="float32")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 97, 5000)
    tc = llm.TrainConfig(batch_size=4, max_iters=5, warmup_iters=2, eval_interval=1000)
    cpu_model, cpu_state = trained("cpu", cfg, tc, data)
    gpu_model, gpu_state = trained("cuda", cfg, tc, data)
    assert isinstance(gpu_model.params["wte.weight"], gpu.ndarray)
    np.testing.assert_allclose([loss for _, loss, _ in gpu_state.history],
                               [loss for _, loss, _ in cpu_state.history], rtol=2e-4)
    for name, p in cpu_model.params.items():
        np.testing.assert_allclose(llm.to_numpy(gpu_model.params[name]), p, rtol=1e-3, atol=1e-4)
    # a checkpoint saved from the GPU loads back (on the GPU) unchanged
    path = str(tmp_path / "gpu.safetensors")
    llm.save_checkpoint(path, gpu_model, llm.byte_tokenizer())
    model, _, _, _ = llm.load_checkpoint(path)
    for name, p in gpu_model.params.items():
        assert gpu.array_equal(model.params[name], p)
