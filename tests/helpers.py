"""What several test files share, written once: where the project and the
shared data are, the float32 tolerance, random arrays, float64 references
for the layers, central finite differences, small models, and the GPU
emulated on the CPU (fastops.c's CUDA section built with g++, fakecupy as
CuPy). Test modules import this module, never each other.
"""
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                 # llm, train, bench, build_ext, data: this checkout's
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

import build_ext  # noqa: E402
import llm  # noqa: E402


def shared_file(name):
    """A file from ../shared/data, or skip: users who clone the project lack it."""
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent")
    return path


# ---- tolerances ---------------------------------------------------------------------

GRAD_TOL = 1e-5         # relative error of a float64 backward against finite differences


def close(got, ref, K):
    """float32 sums of K terms of O(1) products against a float64 reference:
    error ~ eps * sqrt(K). `got` may live on the GPU."""
    np.testing.assert_allclose(llm.to_numpy(got), ref, rtol=1e-4, atol=4e-5 * (1 + math.sqrt(K)))


# ---- random arrays and float64 references -------------------------------------------

def randn(rng, *shape):
    """Standard normal float32, the kernels' dtype."""
    return rng.standard_normal(shape).astype(np.float32)


def linear_reference(x, w, b, dy):
    """float64 y = x w + b and its gradients -> y, dx, dw, db."""
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    y = x @ w + (0 if b is None else b.astype(np.float64))
    return y, dy @ w.T, x.T @ dy, dy.sum(0)


def close_to_linear(x, w, b, dy, y, dx, dw, db):
    """A float32 linear layer's y = x w + b and gradients dx, dw, db (given
    dy) against linear_reference, each with its own number of terms; an
    output given as None is not checked."""
    (M, K), N = x.shape, w.shape[1]
    for got, want, terms in zip((y, dx, dw, db), linear_reference(x, w, b, dy), (K, N, M, M)):
        if got is not None:
            close(got, want, terms)


def attention_reference(q, k, v, dy):
    """float64 causal attention -> y, lse (the log-sum-exp of each row's
    scores) and the gradients dq, dk, dv."""
    q, k, v, dy = (a.astype(np.float64) for a in (q, k, v, dy))
    T, D = q.shape[-2:]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    lse = (m + np.log(e.sum(-1, keepdims=True)))[..., 0]
    p = e / e.sum(-1, keepdims=True)
    y = p @ v
    dp = dy @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / math.sqrt(D)
    return y, lse, ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ dy


def gelu_reference(x, dy):
    """float64 GELU (tanh approximation): y and dx = dy * gelu'(x)."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    dgelu = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    return 0.5 * x * (1 + t), dy * dgelu


def layernorm_reference(x, w, b, dy, eps=1e-5):
    """float64 LayerNorm over the last axis of a (M, C) x -> y, mean, rstd,
    dx, dw, db."""
    x, w, b, dy = (a.astype(np.float64) for a in (x, w, b, dy))
    mu = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return xhat * w + b, mu[:, 0], rstd[:, 0], dx, (dy * xhat).sum(0), dy.sum(0)


# ---- central finite differences in float64, the judge of every backward pass ----------

def numerical_grad(f, x, eps=1e-6, max_coords=None, rng=None):
    """d f() / d x by central differences, x changed in place and restored.
    With max_coords, only that many random coordinates (others are NaN)."""
    g = np.full(x.shape, np.nan)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    coords = range(flat.size)
    if max_coords is not None and flat.size > max_coords:
        coords = (rng or np.random.default_rng(0)).choice(flat.size, max_coords, replace=False)
    for i in coords:
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(analytic, numeric):
    """Norm-wise relative error over the coordinates that were checked."""
    ok = ~np.isnan(numeric)
    a, n = np.asarray(analytic)[ok], numeric[ok]
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(n), np.linalg.norm(a), 1e-12))


# ---- small models ------------------------------------------------------------------

def tiny(dtype="float64", dropout=0.0, seed=0, jitter=0.3, **config):
    """A GPT small enough for finite differences: 2 layers, 2 heads, 8 wide,
    a context of 6, 11 tokens (any GPTConfig field can be given by keyword).
    jitter: the spread of noise added to GPT-2's initialisation, so that
    every gradient is far above finite-difference noise; 0 keeps GPT-2's
    initialisation as it is."""
    cfg = llm.GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=11),
                           **config}, dtype=dtype, dropout=dropout)
    m = llm.GPT(cfg, seed=seed)
    if jitter:
        # (float64 noise: with it the weights are float64 whatever `dtype` says)
        r = np.random.default_rng(seed + 1)
        for k, v in m.params.items():
            m.params[k] = v + r.normal(0, jitter, v.shape)
    return m


def untrained(vocab_size, block_size=32, seed=0):
    """A float32 GPT with GPT-2's initialisation, 2 layers, 2 heads, 16 wide:
    a model to save, load, sample from or look inside, not to differentiate."""
    return tiny("float32", seed=seed, jitter=0, n_embd=16, block_size=block_size,
                vocab_size=vocab_size)


def trained(device, cfg, tc, data, seed=1):
    """GPT(cfg, seed) after tc.max_iters steps of llm.train_steps on `device`
    ('cpu' or 'cuda'), on batches of the token array `data` (the same batches
    on every device) -> (model, TrainState)."""
    llm.use_device(device)
    model, state = llm.GPT(cfg, seed=seed), llm.TrainState()
    llm.train_steps(model, state, tc, lambda r: llm.get_batch(data, cfg.block_size, tc.batch_size, r))
    return model, state


# ---- the CUDA kernels emulated on the CPU --------------------------------------------
# The very text of fastops.c's CUDA section, compiled by g++ against
# tests/cuda_emu/cuda_runtime.h, a stand-in for the CUDA runtime (see the
# header, and test_cuda_emu.py for what this can and cannot verify).

EMU = os.path.join(ROOT, "tests", "cuda_emu")
CXX = shutil.which("g++")
FLAGS = ["-x", "c++", "-std=c++20", "-O1", "-D__CUDACC__", "-fPIC", "-shared", "-I", EMU,
         "-fno-strict-aliasing",                    # float4 reads of float arrays, as in CUDA
         "-fno-gnu-unique"]                         # each library keeps its own __shared__ arrays
# `kernel<<<grid, block>>>(` or `kernel<N><<<grid, block>>>(`; grid and block may hold commas
LAUNCH = re.compile(r"\b(\w+(?:<\w+>)?)<<<(.*?)>>>\(")


def emulated(src, path):
    """CUDA source -> C++ for the emulator: only the launches change, each
    `kernel<<<grid, block>>>(args)` into `emu_launch(kernel, grid, block)(args)`."""
    out, n = LAUNCH.subn(r"emu_launch(\1, \2)(", src)
    assert n == src.count("<<<") and ">>>" not in out, "a kernel launch the rewrite missed"
    return f'#line 1 "{path}"\n' + out                # diagnostics point into the original


def build(src, path, extra=()):
    """Compile emulated(src) into a .so, cached in the temp dir by the hash of
    everything that goes into it. Skips without g++ or outside Linux."""
    if CXX is None:
        pytest.skip("g++ is absent: the CUDA emulation needs it")
    if not sys.platform.startswith("linux"):
        pytest.skip("the CUDA emulation needs Linux (ucontext, dl_iterate_phdr)")
    with open(os.path.join(EMU, "cuda_runtime.h")) as f:
        header = f.read()
    cpp, flags = emulated(src, path), FLAGS + list(extra)
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([cpp, header, version, *flags]).encode()).hexdigest()[:16]
    cache = os.path.join(tempfile.gettempdir(), f"fastops_cuda_emu_{os.getuid()}")
    os.makedirs(cache, exist_ok=True)
    so = os.path.join(cache, f"{key}.so")
    if not os.path.exists(so):
        tmp = os.path.join(cache, f"{key}.{os.getpid()}")
        with open(tmp + ".cpp", "w") as f:
            f.write(cpp)
        r = subprocess.run([CXX, *flags, tmp + ".cpp", "-o", tmp + ".so"], capture_output=True,
                           text=True)
        assert r.returncode == 0, f"g++ failed:\n{r.stderr[-5000:]}"
        os.replace(tmp + ".cpp", so[:-3] + ".cpp")  # kept beside the library, for debugging
        os.replace(tmp + ".so", so)                 # atomic: a concurrent run sees all or nothing
    return so


def build_fastops(extra=()):
    """fastops.c's CUDA section built for the emulator -> the .so's path."""
    path = os.path.join(ROOT, "fastops.c")
    with open(path) as f:
        return build(f.read(), path, extra)


def emulated_gpu(monkeypatch, kernels=True):
    """The GPU emulated on the CPU, undone by monkeypatch when the test ends:
    fakecupy (NumPy under CuPy's rules) as CuPy and, with kernels,
    fastops.c's CUDA section compiled for the CPU (build_fastops) as the
    CUDA kernels: llm.py's device wrappers hand them fakecupy's addresses as
    device pointers. Without kernels, llm.py uses CuPy's own math there.
    Runs wherever g++ does. llm moves to it at use_device("cuda").
    -> the array module, fakecupy."""
    import fakecupy
    cuda = None
    if kernels:
        import cffi
        ffi = cffi.FFI()
        ffi.cdef(build_ext.CUDA_CDEF)
        cuda = types.SimpleNamespace(ffi=ffi, lib=ffi.dlopen(build_fastops()))
    fakecupy.install(monkeypatch)
    monkeypatch.setattr(llm, "_cuda", None)                # restored afterwards
    monkeypatch.setattr(llm, "_load_cuda", lambda: cuda)
    return fakecupy
