"""fastops.c's CUDA kernels, run on the CPU by emulation, against float64 NumPy references.

The very text of fastops.c's CUDA section (not a copy) is compiled by g++
against tests/cuda_emu/cuda_runtime.h, a stand-in for the CUDA runtime: each
`kernel<<<grid, block>>>(args)` is rewritten into `emu_launch(kernel, grid,
block)(args)` and every CUDA thread of a block runs as a fiber, switching at
__syncthreads() and shuffles (see the header for the model; the rewrite and
the build are helpers.build_fastops, which test_cuda.py and
test_device_path.py use too).

What this verifies: the kernels' arithmetic and indexing (results against
float64 references, for shapes at and around every tile and block edge, all
three head-size templates, transposed and strided operands); their bounds
(outputs pre-filled with NaN and padding around strided operands filled
with NaN or a sentinel, shared memory NaN at every block start, and a run
under AddressSanitizer + UBSan in a subprocess, where any read or write past
a buffer, misaligned float4 access or other undefined behaviour fails the
test); the block/thread decomposition; and barrier placement (threads run in
forward, reverse and shuffled orders between barriers, so a missing
__syncthreads() gives a wrong result, and a barrier or shuffle that not all
threads reach is reported as a deadlock).

What it cannot verify: the GPU's memory model and warp scheduling (here
threads never run at the same time, blocks never overlap and a warp has no
lockstep), float4 alignment faults as the GPU raises them (UBSan checks that
every float4 access is 16-byte aligned given the arrays' declared alignment,
not how nvcc lays shared memory out), register and shared-memory limits
(nvcc checks those when it builds), nvcc's arithmetic (fused multiply-adds,
its exp2f), performance, and the nvcc-compiled binary itself (test_cuda.py
builds it; only a GPU can run it).

The emulator itself is tested too: a toy kernel's missing barrier, a
divergent barrier, a bad launch, a write outside cudaMalloc'd memory and the
warp shuffles must all show.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from helpers import (CXX, attention_reference, build, build_fastops, close, close_to_linear,
                     gelu_reference, layernorm_reference, randn)
import build_ext  # noqa: E402  (after helpers, which puts it on sys.path when this runs as a script)

SANITIZE = ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer"]
CDEF = build_ext.CUDA_CDEF + "void emu_schedule(unsigned seed);"

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**32 - 1)       # for emu_schedule: 0 in order, 1 reversed, else shuffled


# ---- the emulated library and its guarded buffers ----------------------------------

MARGIN = 256                            # floats on each side of every test buffer
POISON = 0x7FC0DEAD                     # a NaN with a payload: reading it poisons results


def guarded(a):
    """A copy of `a` inside a larger buffer whose margins hold POISON: a kernel
    that reads them gets NaN, one that writes them fails Emu.__call__."""
    big = np.full(a.size + 2 * MARGIN, POISON, np.uint32)
    out = big.view(np.float32)[MARGIN:MARGIN + a.size].reshape(a.shape)
    out[...] = a
    return out


def margins_intact(a):
    big = a.base
    assert big is not None and big.size == a.size + 2 * MARGIN, "not a guarded() buffer"
    return (big[:MARGIN] == POISON).all() and (big[-MARGIN:] == POISON).all()


class Emu:
    """The emulated library, with calls that fail the test on a CUDA error or
    (guards=True: arrays from guarded()) on a write outside an array."""

    def __init__(self, so, guards=True):
        import cffi
        self.ffi = cffi.FFI()
        self.ffi.cdef(CDEF)
        self.lib = self.ffi.dlopen(so)
        self.guards = guards

    def ptr(self, a):
        return self.ffi.NULL if a is None else self.ffi.cast("float *", self.ffi.from_buffer(a))

    def error(self):
        msg = self.lib.fo_cuda_error()
        return None if msg == self.ffi.NULL else self.ffi.string(msg).decode()

    def __call__(self, name, *args):
        getattr(self.lib, name)(*(self.ptr(a) if isinstance(a, np.ndarray) or a is None else a
                                  for a in args))
        assert self.error() is None
        for a in args:
            if self.guards and isinstance(a, np.ndarray):
                assert margins_intact(a), f"{name} wrote outside an array"


@pytest.fixture(scope="module")
def emu():
    return Emu(build_fastops())


def schedule(emu, seed):
    emu.lib.emu_schedule(seed)


# ---- test buffers ------------------------------------------------------------------------

def guarded_randn(rng, *shape):
    """helpers.randn in a guarded() buffer."""
    return guarded(randn(rng, *shape))


def nans(*shape):
    """An output buffer: anything the kernel should write but does not stays NaN."""
    return guarded(np.full(shape, np.nan))


def operand(rng, rows, cols, transposed, pad):
    """A (rows, cols) matrix inside a larger buffer whose extra `pad` columns
    (row-major) or rows (transposed) are NaN: reading them poisons the result.
    -> (buffer, the matrix, row stride, column stride)."""
    if transposed:
        buf = nans(cols, rows + pad)
        buf[:, :rows] = randn(rng, cols, rows)
        return buf, buf[:, :rows].T, 1, rows + pad
    buf = nans(rows, cols + pad)
    buf[:, :cols] = randn(rng, rows, cols)
    return buf, buf[:, :cols], cols + pad, 1


# ---- GEMM, column sums, linear layer --------------------------------------------------

def check_sgemm(emu, M, N, K, trans_a, trans_b, accumulate, bias, pad, seed):
    rng = np.random.default_rng(seed)
    schedule(emu, seed)
    a_buf, a, rsa, csa = operand(rng, M, K, trans_a, pad)
    b_buf, b, rsb, csb = operand(rng, K, N, trans_b, pad)
    bvec = guarded_randn(rng, N) if bias else None
    c_buf = guarded(np.full((M, N + pad), -7.0))     # columns past N: a sentinel, untouched
    c_buf[:, :N] = randn(rng, M, N) if accumulate else np.nan
    c0 = c_buf[:, :N].astype(np.float64)
    emu("fo_sgemm", M, N, K, a_buf, rsa, csa, b_buf, rsb, csb, c_buf, N + pad, int(accumulate),
        bvec)
    ref = a.astype(np.float64) @ b.astype(np.float64) + (c0 if accumulate else 0.0)
    close(c_buf[:, :N], ref + (0.0 if bvec is None else bvec), max(K, 1))
    assert (c_buf[:, N:] == -7.0).all(), "fo_sgemm wrote past column N"


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_sgemm_every_layout(emu, trans_a, trans_b, accumulate, bias):
    """All operand layouts and flags on a shape off every tile edge
    (M > 128, N < 128, K not a multiple of 8)."""
    check_sgemm(emu, 130, 67, 9, trans_a, trans_b, accumulate, bias, pad=0, seed=0)


DIMS = st.sampled_from([1, 2, 3, 7, 8, 33, 64, 127, 128, 129, 200, 257])


@SETTINGS
@given(M=DIMS, N=DIMS, K=st.sampled_from([0, 1, 2, 7, 8, 9, 16, 17, 100, 300]),
       trans_a=st.booleans(), trans_b=st.booleans(), accumulate=st.booleans(),
       bias=st.booleans(), pad=st.sampled_from([0, 3]), seed=SEEDS)
@example(M=1, N=1, K=1, trans_a=False, trans_b=False, accumulate=False, bias=False, pad=0, seed=0)
@example(M=128, N=128, K=8, trans_a=True, trans_b=True, accumulate=True, bias=True, pad=0, seed=1)
@example(M=129, N=257, K=1, trans_a=False, trans_b=True, accumulate=False, bias=True, pad=3, seed=2)
def test_sgemm_matches_float64(emu, M, N, K, trans_a, trans_b, accumulate, bias, pad, seed):
    check_sgemm(emu, M, N, K, trans_a, trans_b, accumulate, bias, pad, seed)


@SETTINGS
@given(M=st.sampled_from([0, 1, 2, 31, 32, 33, 100]), N=st.sampled_from([1, 2, 31, 32, 33, 65]),
       seed=SEEDS)
@example(M=33, N=65, seed=1)
def test_colsum_matches_float64(emu, M, N, seed):
    rng = np.random.default_rng(seed)
    schedule(emu, seed)
    dy, db = guarded_randn(rng, M, N), nans(N)
    emu("fo_colsum", dy, db, M, N)
    close(db, dy.astype(np.float64).sum(0), M)


@SETTINGS
@given(M=st.sampled_from([1, 3, 64, 130]), K=st.sampled_from([1, 5, 8, 33]),
       N=st.sampled_from([1, 7, 32, 129]), with_dx=st.booleans(), with_db=st.booleans(), seed=SEEDS)
def test_linear_matches_float64(emu, M, K, N, with_dx, with_db, seed):
    rng = np.random.default_rng(seed)
    schedule(emu, seed)
    x, w, b, dy = (guarded_randn(rng, *shape) for shape in ((M, K), (K, N), (N,), (M, N)))
    y, dw = nans(M, N), nans(K, N)
    dx, db = (nans(M, K) if with_dx else None), (nans(N) if with_db else None)
    emu("fo_linear_forward", x, w, b, y, M, K, N)
    emu("fo_linear_backward", dy, x, w, dx, dw, db, M, K, N)
    close_to_linear(x, w, b, dy, y, dx, dw, db)               # dx, db: None when not asked for


# ---- attention --------------------------------------------------------------------------

def packed(H, T, D):
    """The element strides (b, h, t) of packed (B, H, T, D) heads, for q, k, v and for y:
    the only layout the GPU kernels take."""
    return (H * T * D, T * D, D) * 2


def check_attention(emu, B, H, T, D, seed):
    rng = np.random.default_rng(seed)
    schedule(emu, seed)
    q, k, v, dy = (guarded_randn(rng, B, H, T, D) for _ in range(4))
    y, dq, dk, dv = (nans(B, H, T, D) for _ in range(4))
    lse = nans(B, H, T)
    emu("fo_attention_forward", q, k, v, y, lse, B, H, T, D, *packed(H, T, D))
    emu("fo_attention_backward", dy, q, k, v, y, lse, dq, dk, dv, B, H, T, D, *packed(H, T, D))
    ref_y, ref_lse, *ref_grads = attention_reference(q, k, v, dy)
    close(y, ref_y, T)
    close(lse, ref_lse, T)
    for got, want in zip((dq, dk, dv), ref_grads):
        close(got, want, T * D)


@pytest.mark.parametrize("B,H,T,D", [
    (1, 1, 1, 1),       # DM=32, one row
    (2, 1, 65, 7),      # DM=32: the second 64-row block holds one row
    (1, 2, 64, 32),     # DM=32, exactly one block
    (1, 2, 130, 33),    # DM=64: three 64-row blocks, key tiles of 64
    (2, 1, 63, 64),     # DM=64, one short block
    (1, 1, 97, 65),     # DM=128: key/query tiles of 32 rows
    (1, 2, 33, 128),    # DM=128, full width
])
@pytest.mark.parametrize("seed", [0, 1, 2])          # in order, reversed, shuffled
def test_attention_each_head_size_template(emu, B, H, T, D, seed):
    check_attention(emu, B, H, T, D, seed)


@pytest.mark.parametrize("T,first", [(40, 16), (130, 64)])
def test_attention_with_scores_far_apart(emu, T, first):
    """Scores +120 on the first `first` keys, -120 after (exp overflows
    float32): right only if each row's running maximum carries across the
    key chunks; random q, k never come near."""
    q = guarded(np.ones((1, 1, T, 16), np.float32))
    k = np.full((1, 1, T, 16), -30.0, np.float32)
    k[..., :first, :] = 30.0
    k, v, dy = guarded(k), guarded_randn(np.random.default_rng(0), 1, 1, T, 16), guarded_randn(np.random.default_rng(1), 1, 1, T, 16)
    y, dq, dk, dv = (nans(1, 1, T, 16) for _ in range(4))
    lse = nans(1, 1, T)
    emu("fo_attention_forward", q, k, v, y, lse, 1, 1, T, 16, *packed(1, T, 16))
    emu("fo_attention_backward", dy, q, k, v, y, lse, dq, dk, dv, 1, 1, T, 16, *packed(1, T, 16))
    ref_y, ref_lse, *ref_grads = attention_reference(q, k, v, dy)
    close(y, ref_y, T)
    close(lse, ref_lse, T)
    for got, want in zip((dq, dk, dv), ref_grads):
        close(got, want, T * 16)


@SETTINGS
@given(B=st.sampled_from([1, 2]), H=st.sampled_from([1, 3]),
       T=st.sampled_from([1, 2, 3, 17, 31, 32, 33, 63, 64, 65, 100, 129]),
       D=st.sampled_from([1, 4, 7, 16, 31, 32, 33, 48, 63, 64, 65, 96, 127, 128]), seed=SEEDS)
def test_attention_matches_float64(emu, B, H, T, D, seed):
    check_attention(emu, B, H, T, D, seed)


# ---- GELU and LayerNorm ------------------------------------------------------------------

@SETTINGS
@given(n=st.sampled_from([1, 2, 255, 256, 257, 1000, 70000]), scale=st.sampled_from([1.0, 30.0]),
       seed=SEEDS)
def test_gelu_matches_float64(emu, n, scale, seed):
    rng = np.random.default_rng(seed)
    schedule(emu, seed)
    x, dy, y, dx = guarded(rng.standard_normal(n) * scale), guarded_randn(rng, n), nans(n), nans(n)
    x[:2] = [1e20, -1e20][:n]                       # x^3 overflows float32: no inf, no nan
    emu("fo_gelu_forward", x, y, n)
    emu("fo_gelu_backward", dy, x, dx, n)
    ref_y, ref_dx = gelu_reference(x, dy)
    close(y, ref_y, 1)
    close(dx, ref_dx, 1)


def test_gelu_past_the_grid_s_cap(emu):
    """More elements than the capped grid (8192 blocks of 256 threads) has
    threads, as GPT-2's MLP has (B*T x 3072): each thread takes several."""
    n = 8192 * 256 + 1000
    rng = np.random.default_rng(0)
    schedule(emu, 0)
    x, dy, y, dx = guarded_randn(rng, n), guarded_randn(rng, n), nans(n), nans(n)
    emu("fo_gelu_forward", x, y, n)
    emu("fo_gelu_backward", dy, x, dx, n)
    ref_y, ref_dx = gelu_reference(x, dy)
    close(y, ref_y, 1)
    close(dx, ref_dx, 1)


@SETTINGS
@given(M=st.sampled_from([0, 1, 7, 8, 9, 33]), C=st.sampled_from([1, 2, 31, 32, 33, 100, 768]),
       seed=SEEDS)
@example(M=9, C=33, seed=1)
@example(M=33, C=2, seed=1)                     # rows of two nearly equal values: rstd ~ 300
def test_layernorm_matches_float64(emu, M, C, seed):
    rng = np.random.default_rng(seed)
    schedule(emu, seed)
    x = guarded(rng.standard_normal((M, C)) * 2 + 1)                # mean 1, not 0
    w, b, dy = guarded_randn(rng, C), guarded_randn(rng, C), guarded_randn(rng, M, C)
    y, mean, rstd, dx, dw, db = nans(M, C), nans(M), nans(M), nans(M, C), nans(C), nans(C)
    emu("fo_layernorm_forward", x, w, b, y, mean, rstd, M, C, 1e-5)
    emu("fo_layernorm_backward", dy, x, w, mean, rstd, dx, dw, db, M, C)
    ref_y, ref_mean, ref_rstd, ref_dx, ref_dw, ref_db = layernorm_reference(x, w, b, dy, 1e-5)
    close(y, ref_y, C)
    close(mean, ref_mean, C)
    close(rstd, ref_rstd, C)
    # dx = rstd * (O(1) terms): a row whose values nearly agree has rstd up to
    # 1/sqrt(eps) ~ 316, which scales float32's rounding with it
    close(dx / ref_rstd[:, None], ref_dx / ref_rstd[:, None], C)
    close(dw, ref_dw, max(M, 1))
    close(db, ref_db, max(M, 1))


def test_error_messages(emu):
    """Unsupported shapes are reported through fo_cuda_error, and reading clears it."""
    ffi, lib, null = emu.ffi, emu.lib, emu.ffi.NULL
    lib.fo_attention_forward(null, null, null, null, null, 1, 1, 4, 129, *packed(1, 4, 129))
    assert "fo_attention_forward: head size 129 > 128" in emu.error()
    assert emu.error() is None
    lib.fo_attention_backward(null, null, null, null, null, null, null, null, null, 1, 1, 4, 129,
                              *packed(1, 4, 129))
    assert "fo_attention_backward: head size 129 > 128" in emu.error()
    lib.fo_attention_forward(null, null, null, null, null, 65536, 1, 4, 64, *packed(1, 4, 64))
    assert "B*H > 65535" in emu.error()
    lib.fo_attention_forward(null, null, null, null, null, 1, 2, 4, 64, *packed(2, 4, 64)[:3], 3 * 64, 64, 2 * 64)
    assert "fo_attention_forward: heads must be packed (B, H, T, D) on the GPU" in emu.error()
    lib.fo_sgemm(128 * 65535 + 1, 1, 1, null, 1, 1, null, 1, 1, null, 1, 0, null)
    assert "M too large" in emu.error()
    assert lib.fo_cuda_sync() == ffi.NULL              # nothing pending: the sync succeeds


def test_attention_at_the_largest_b_times_h(emu):
    """B*H = 65535, the most the grid takes, is computed, not refused."""
    B, H, T, D = 65535, 1, 1, 1
    rng = np.random.default_rng(1)
    q, k, v = (guarded_randn(rng, B, H, T, D) for _ in range(3))
    y, lse = nans(B, H, T, D), nans(B, H, T)
    emu("fo_attention_forward", q, k, v, y, lse, B, H, T, D, *packed(H, T, D))
    np.testing.assert_array_equal(y, v)                # one position: it reads itself
    np.testing.assert_allclose(lse[..., 0], (q * k)[..., 0, 0], rtol=1e-6, atol=1e-6)


# ---- out-of-bounds accesses: the same kernels under AddressSanitizer + UBSan -------------

def sanitizer_workload(emu):
    """Every entry point on buffers of exactly the size the call needs, from
    (the sanitizer's) malloc: one element past the end is a redzone."""
    emu.ffi.cdef("void *malloc(size_t n); void free(void *p);")
    libc = emu.ffi.dlopen(None)                     # with LD_PRELOAD, malloc is the sanitizer's
    keep = []

    def buf(*shape, fill=True):
        n = math.prod(shape)
        p = emu.ffi.gc(emu.ffi.cast("float *", libc.malloc(4 * max(n, 1))), libc.free)
        a = np.frombuffer(emu.ffi.buffer(p, 4 * n), np.float32).reshape(shape)
        a[...] = np.random.default_rng(n).standard_normal(shape) if fill else np.nan
        keep.append(p)
        return a

    for M, N, K in [(130, 67, 9), (1, 1, 1), (128, 128, 8), (3, 129, 17)]:
        for trans_a in (False, True):
            for trans_b in (False, True):
                a, b, c, bias = buf(M, K), buf(K, N), buf(M, N), buf(N)
                rsa, csa = (1, M) if trans_a else (K, 1)
                rsb, csb = (1, K) if trans_b else (N, 1)
                emu("fo_sgemm", M, N, K, a, rsa, csa, b, rsb, csb, c, N, 1, bias)
        emu("fo_colsum", buf(M, N), buf(N, fill=False), M, N)
        emu("fo_linear_forward", buf(M, K), buf(K, N), None, buf(M, N, fill=False), M, K, N)
        emu("fo_linear_backward", buf(M, N), buf(M, K), buf(K, N), buf(M, K, fill=False),
            buf(K, N, fill=False), buf(N, fill=False), M, K, N)
    for B, H, T, D in [(1, 2, 65, 7), (1, 1, 1, 32), (2, 1, 66, 33), (1, 2, 64, 64), (1, 1, 65, 65),
                       (1, 1, 40, 128)]:
        q, k, v, dy = (buf(B, H, T, D) for _ in range(4))
        y, lse = buf(B, H, T, D, fill=False), buf(B, H, T, fill=False)
        emu("fo_attention_forward", q, k, v, y, lse, B, H, T, D, *packed(H, T, D))
        emu("fo_attention_backward", dy, q, k, v, y, lse, buf(B, H, T, D, fill=False),
            buf(B, H, T, D, fill=False), buf(B, H, T, D, fill=False), B, H, T, D, *packed(H, T, D))
    assert np.isfinite(y).all()
    for M, C in [(1, 1), (9, 33), (3, 768)]:
        x, dy = buf(M, C), buf(M, C)
        y, mean, rstd = buf(M, C, fill=False), buf(M, fill=False), buf(M, fill=False)
        emu("fo_layernorm_forward", x, buf(C), buf(C), y, mean, rstd, M, C, 1e-5)
        emu("fo_layernorm_backward", dy, x, buf(C), mean, rstd, buf(M, C, fill=False),
            buf(C, fill=False), buf(C, fill=False), M, C)
        emu("fo_gelu_forward", x, y, M * C)
        emu("fo_gelu_backward", dy, x, buf(M, C, fill=False), M * C)
        assert np.isfinite(y).all()


def test_no_out_of_bounds_access_under_sanitizers():
    if CXX is None:
        pytest.skip("g++ is absent: the CUDA emulation needs it")
    runtimes = [subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True,
                               text=True).stdout.strip() for name in ("libasan.so", "libubsan.so")]
    if not all(os.path.isabs(path) for path in runtimes):
        pytest.skip("g++'s sanitizer runtimes (libasan, libubsan) are absent")
    so, libasan = build_fastops(SANITIZE), runtimes[0]
    env = {**os.environ, "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0",
           "UBSAN_OPTIONS": "print_stacktrace=1"}
    r = subprocess.run([sys.executable, __file__, so], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("sanitizer workload ok"), \
        f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


# ---- the emulator itself: a broken kernel must fail --------------------------------------

TOY = r"""
#include <cuda_runtime.h>
__global__ void reverse_kernel(const float *in, float *out, int sync) {
    __shared__ float s[64];
    s[threadIdx.x] = in[threadIdx.x];
    if (sync) __syncthreads();                      /* uniform: legal either way */
    out[threadIdx.x] = s[63 - threadIdx.x];
}
__global__ void divergent_kernel(float *out) {
    if (threadIdx.x < 5) __syncthreads();
    out[threadIdx.x] = 1.0f;
}
__global__ void shuffle_kernel(const float *in, float *out, int lane_mask) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = __shfl_xor_sync(0xffffffffu, in[i], lane_mask);
}
extern "C" const char *toy_error(void) {
    static char buf[512];
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return NULL;
    snprintf(buf, sizeof buf, "%s", cudaGetErrorString(e));
    return buf;
}
extern "C" void toy_reverse(const float *in, float *out, int sync) {
    reverse_kernel<<<1, 64>>>(in, out, sync);
}
extern "C" void toy_divergent(float *out) { divergent_kernel<<<1, 32>>>(out); }
extern "C" void toy_shuffle(const float *in, float *out, int lane_mask) {
    shuffle_kernel<<<2, 64>>>(in, out, lane_mask);
}
extern "C" void toy_bad_launch(float *out) { divergent_kernel<<<dim3(1, 65536), 32>>>(out); }
__global__ void offset_kernel(float *p, int offset) { p[(int)threadIdx.x + offset] = 0.0f; }
extern "C" void toy_overrun(int offset) {                /* 64 threads on 64 floats, shifted */
    float *p;
    cudaMalloc((void **)&p, 64 * sizeof(float));
    offset_kernel<<<1, 64>>>(p, offset);
    cudaFree(p);
}
"""


@pytest.fixture(scope="module")
def toy():
    import cffi
    ffi = cffi.FFI()
    ffi.cdef("""const char *toy_error(void); void emu_schedule(unsigned seed);
        void toy_reverse(const float *in, float *out, int sync); void toy_divergent(float *out);
        void toy_shuffle(const float *in, float *out, int lane_mask);
        void toy_bad_launch(float *out);
        void toy_overrun(int offset);""")
    lib = ffi.dlopen(build(TOY, "toy.cu"))

    def ptr(a):
        return ffi.from_buffer("float[]", a)

    def error():
        msg = lib.toy_error()
        return None if msg == ffi.NULL else ffi.string(msg).decode()
    return lib, ptr, error


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_emulator_exposes_a_missing_barrier(toy, seed):
    lib, ptr, error = toy
    x, out = np.arange(64, dtype=np.float32), nans(64)
    lib.emu_schedule(seed)
    lib.toy_reverse(ptr(x), ptr(out), 1)
    assert error() is None and (out == x[::-1]).all()
    lib.toy_reverse(ptr(x), ptr(out), 0)
    assert error() is None and not (out == x[::-1]).all()


def test_emulator_reports_a_divergent_barrier_and_a_bad_launch(toy):
    lib, ptr, error = toy
    out = nans(32)
    lib.toy_divergent(ptr(out))
    msg = error()
    assert "deadlock" in msg and "5 at __syncthreads()" in msg and "27 finished" in msg
    lib.toy_bad_launch(ptr(out))
    assert error() == "invalid configuration argument"


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_emulator_catches_a_write_outside_cuda_malloc_memory(toy, offset):
    lib, ptr, error = toy
    lib.toy_overrun(offset)
    wrote_outside = "emulator: a kernel wrote outside a cudaMalloc'd buffer"
    assert error() == (None if offset == 0 else wrote_outside)


def test_emulator_shuffles_within_each_warp(toy):
    lib, ptr, error = toy
    x, out = np.arange(128, dtype=np.float32), nans(128)
    for lane_mask in (1, 16, 31):
        lib.toy_shuffle(ptr(x), ptr(out), lane_mask)
        assert error() is None
        i = np.arange(128)
        np.testing.assert_array_equal(out, x[i - i % 32 + (i % 32 ^ lane_mask)])


if __name__ == "__main__":                          # the sanitizer run's subprocess
    sanitizer_workload(Emu(sys.argv[1], guards=False))
    print("sanitizer workload ok")
