"""fastops, the C kernels on the CPU (llm.py section 10), against float64
references: the linear layer (a transposed weight too, fo_sgemm's
accumulate flag, fo_linear_backward_input), attention (also a convex
combination of past values, and causal bit for bit), GELU (extremes too)
and LayerNorm, on shapes hypothesis picks around every tile edge; bad input
is an error naming the argument, or a copy; the layer table `ops` holds the
kernels, NumPy for float64 or after set_backend("numpy") (which refuses an
unknown backend); the whole model's loss and gradients equal the NumPy
path's; any number of threads gives the same bits, and a team smaller than
asked for the team's; and a kernel that cannot get its scratch memory
raises MemoryError instead of crashing.

Skipped as a whole when _fastops is not built (`python build_ext.py`) or
LLM_NUMPY=1. Every kernel path this CPU can run (AVX-512, AVX2, portable C)
is exercised through fo_set_isa. Speed is measured in bench.py, not here.
"""
import contextlib
import copy
import json
import math
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import llm
from helpers import (ROOT, attention_reference, close, close_to_linear, gelu_reference,
                     layernorm_reference, randn)

if llm._fastops is None:
    pytest.skip("fastops is not built (python build_ext.py) or LLM_NUMPY=1",
                allow_module_level=True)

lib = llm._fastops.lib
ISAS = [name for name in ("amx", "avx512", "avx2", "generic") if lib.fo_set_isa(name.encode()) == 0]
lib.fo_set_isa(b"auto")


def test_every_isa_this_cpu_has_is_tested():
    """The tests run each kernel on every ISA in ISAS: one the CPU has but
    fo_set_isa refused would go untested with nothing failing."""
    flags = set()
    if os.path.isfile("/proc/cpuinfo"):
        flags = set(re.search(r"^flags\s*:(.*)$", open("/proc/cpuinfo").read(), re.M).group(1).split())
    expect = {"generic"} | ({"avx2"} if {"avx2", "fma"} <= flags else set()) | (
        {"avx512"} if "avx512f" in flags else set())
    assert expect <= set(ISAS)

FAST = settings(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# sizes that stress the edges: 1, primes, around multiples of 8/16/32, and the micro-tiles
DIMS = st.sampled_from([1, 2, 3, 5, 7, 8, 12, 13, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97, 129])


@contextlib.contextmanager
def isa(name):
    assert lib.fo_set_isa(name.encode()) == 0
    try:
        yield
    finally:
        lib.fo_set_isa(b"auto")


# ---- linear layer ----------------------------------------------------------------

@FAST
@given(M=DIMS, K=DIMS, N=DIMS, bias=st.booleans(), path=st.sampled_from(ISAS),
       seed=st.integers(0, 2**16))
@example(M=257, K=383, N=129, bias=True, path=ISAS[0], seed=0)
@example(M=768, K=128, N=384, bias=True, path=ISAS[0], seed=1)
@example(M=100, K=777, N=70, bias=True, path=ISAS[0], seed=2)             # k in blocks: bias once, then C added
@example(M=100, K=777, N=70, bias=True, path=ISAS[min(1, len(ISAS) - 1)], seed=3)
def test_linear_matches_float64_reference(M, K, N, bias, path, seed):
    rng = np.random.default_rng(seed)
    x, w, dy = randn(rng, M, K), randn(rng, K, N), randn(rng, M, N)
    b = randn(rng, N) if bias else None
    with isa(path):
        y = llm.fo_linear_forward(x, w, b)
        dx, dw, db = llm.fo_linear_backward(dy, x, w)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == np.float32
    close_to_linear(x, w, b, dy, y, dx, dw, db)


@FAST
@given(M=DIMS, K=DIMS, N=DIMS, path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
@example(M=1, K=65, N=129, path=ISAS[0], seed=0)   # one row (batch 1's head), a k tail, a last block of 1
def test_linear_transposed_weight(M, K, N, path, seed):
    """The tied output head passes wte.T (a Fortran-ordered view): no copy, same
    result, and dw in the same layout (wte's gradient without a transposing copy)."""
    rng = np.random.default_rng(seed)
    x, wt, dy = randn(rng, M, K), randn(rng, N, K), randn(rng, M, N)
    with isa(path):
        y = llm.fo_linear_forward(x, wt.T, None)
        dx, dw, db = llm.fo_linear_backward(dy, x, wt.T)
    assert dw.shape == (K, N) and dw.T.flags.c_contiguous
    close_to_linear(x, wt.T, None, dy, y, dx, dw, None)
    close(db, dy.astype(np.float64).sum(0), M)


def test_sgemm_accumulates():
    """fo_sgemm's accumulate flag adds into C (llm.py's wrappers always overwrite)."""
    rng = np.random.default_rng(0)
    a, b, c = randn(rng, 37, 50), randn(rng, 50, 29), randn(rng, 37, 29)
    expect = c.astype(np.float64) + a.astype(np.float64) @ b
    lib.fo_sgemm(37, 29, 50, llm._ptr(a), 50, 1, llm._ptr(b), 29, 1, llm._ptr(c), 29, 1,
                 llm._fastops.ffi.NULL)
    close(c, expect, 50)


@settings(deadline=None, max_examples=25)
@given(M=st.integers(1, 2), K=st.sampled_from([513, 640, 777, 1031]), N=st.sampled_from([1023, 1024, 1031]),
       trans_a=st.booleans(), accumulate=st.booleans(), bias=st.booleans(), path=st.sampled_from(ISAS),
       seed=st.integers(0, 2**16))
def test_sgemm_few_rows_streamed(M, K, N, trans_a, accumulate, bias, path, seed):
    """One row against a weight of 2 MB or more (generation at batch 1): the
    path that splits k into chunks of rows, with ragged chunks and columns
    (and two rows, on the strip kernels)."""
    rng = np.random.default_rng(seed)
    a = randn(rng, K, M) if trans_a else randn(rng, M, K)
    b, c, bb = randn(rng, K, N), randn(rng, M, N), randn(rng, N)
    a64 = (a.T if trans_a else a).astype(np.float64)
    expect = a64 @ b + (c if accumulate else 0) + (bb if bias else 0)
    rsa, csa = (1, M) if trans_a else (K, 1)
    with isa(path):
        lib.fo_sgemm(M, N, K, llm._ptr(a), rsa, csa, llm._ptr(b), N, 1, llm._ptr(c), N, int(accumulate),
                     llm._ptr(bb) if bias else llm._fastops.ffi.NULL)
    close(c, expect, K)


@settings(deadline=None, max_examples=40)
@given(M=DIMS, K=st.sampled_from([1, 2, 31, 33, 129, 520, 2048]), N=DIMS, trans_a=st.booleans(),
       trans_b=st.booleans(), path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
@example(M=129, K=2048, N=97, trans_a=True, trans_b=False, path=ISAS[0], seed=0)  # X^T.dY, k in blocks
@example(M=65, K=1, N=64, trans_a=False, trans_b=True, path=ISAS[0], seed=0)      # one term: a single product
def test_sgemm_error_is_float32s(M, K, N, trans_a, trans_b, path, seed):
    """Every product path errs by no more than float32 summation may: each
    element within (K + 8) 2^-24 sum_k |a_ik b_kj| of the exact sum. AMX's
    products are made of bfloat16 parts (see fastops.c): with the parts this
    bound allows, an fp32 product; with fewer (bfloat16 x3, 2^-16 per term)
    this test fails."""
    rng = np.random.default_rng(seed)
    a = randn(rng, K, M).T if trans_a else randn(rng, M, K)
    b = randn(rng, N, K).T if trans_b else randn(rng, K, N)
    a *= np.float32(2.0) ** rng.integers(-20, 20, size=a.shape).astype(np.float32)  # many exponents
    with isa(path):
        c = llm.fo_linear_forward(a, b, None)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = (K + 8) * 2.0**-24 * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    assert np.all(np.abs(c - exact) <= bound)


@pytest.mark.parametrize("path", ISAS)
def test_sgemm_not_finite_as_float32(path):
    """inf and NaN in either operand come out as float32's products make them
    (inf . 1 = inf, inf . 0 = NaN), on every path: AMX hands such products
    to AVX-512, as its bfloat16 parts would turn inf . 1 into NaN."""
    rng = np.random.default_rng(0)
    x, w = randn(rng, 70, 64), np.ones((64, 40), np.float32)
    x[3, 5], x[7, 1], w[9, 2] = np.inf, np.nan, -np.inf
    with isa(path):
        y = llm.fo_linear_forward(x, w, None)
        dx, dw, _ = llm.fo_linear_backward(np.ones_like(y), x, w)
    with np.errstate(invalid="ignore"):
        for got, want in ((y, x.astype(np.float64) @ w), (dx, np.ones_like(y) @ w.T.astype(np.float64)),
                          (dw, x.T.astype(np.float64) @ np.ones_like(y))):
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
            ok = np.isfinite(want)
            close(got[ok], want[ok], 70)


# ---- attention ------------------------------------------------------------------

T_SIZES = st.sampled_from([1, 2, 3, 7, 16, 31, 63, 64, 65, 100, 128, 130, 200])
D_SIZES = st.sampled_from([1, 3, 8, 16, 17, 32, 48, 64, 80])


@FAST
@given(B=st.integers(1, 3), H=st.integers(1, 3), T=T_SIZES, D=D_SIZES,
       path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
@example(B=1, H=1, T=1, D=8, path=ISAS[0], seed=0)
@example(B=1, H=1, T=300, D=64, path=ISAS[0], seed=0)   # few heads: dq per-thread copies
@example(B=4, H=4, T=70, D=32, path=ISAS[0], seed=0)    # many heads: one task per head
def test_attention_matches_float64_reference(B, H, T, D, path, seed):
    rng = np.random.default_rng(seed)
    q, k, v, dy = (randn(rng, B, H, T, D) for _ in range(4))
    with isa(path):
        y, lse = llm.fo_attention_forward(q, k, v)
        dq, dk, dv = llm.fo_attention_backward(dy, q, k, v, y, lse)
    y_ref, lse_ref, dq_ref, dk_ref, dv_ref = attention_reference(q, k, v, dy)
    close(y, y_ref, D)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)
    for got, ref in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        close(got, ref, max(D, T))


@pytest.mark.parametrize("path", ISAS)
@pytest.mark.parametrize("T,first,high,low", [(40, 16, 30, -30), (130, 64, 30, -30), (130, 100, 30, -30),
                                               (70, 16, -30, -50)])
def test_attention_with_scores_far_apart(path, T, first, high, low):
    """Scores from the first `first` keys and from the rest: +120 and -120
    (exp(240) overflows float32), right only if each row's running maximum
    carries across the key tiles; or -120 and -200, only if the maximum
    starts below every score (from 0 both exps underflow, or are clamped
    alike). Random q, k never come near."""
    q = np.ones((1, 1, T, 16), np.float32)
    k = np.full((1, 1, T, 16), low, np.float32)
    k[..., :first, :] = high
    v, dy = (randn(np.random.default_rng(0), 1, 1, T, 16) for _ in range(2))
    with isa(path):
        y, lse = llm.fo_attention_forward(q, k, v)
        grads = llm.fo_attention_backward(dy, q, k, v, y, lse)
        y_last = llm.fo_attention_decode(q[..., -3:, :], k, v)          # generation's: the last 3 positions
    y_ref, lse_ref, *grads_ref = attention_reference(q, k, v, dy)
    close(y, y_ref, T)
    close(y_last, y_ref[..., -3:, :], T)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5)
    for got, ref in zip(grads, grads_ref):
        close(got, ref, T)


GUARDED = r"""
import ctypes, mmap, numpy as np, llm
libc, PAGE = ctypes.CDLL(None), mmap.PAGESIZE

def at_page_end(a):                    # a copy whose last byte is followed by a page that cannot be read
    n = -(-a.nbytes // PAGE) * PAGE
    buf = mmap.mmap(-1, n + PAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(address + n), PAGE, 0) == 0
    out = np.frombuffer(buf, np.uint8, a.nbytes, n - a.nbytes).view(a.dtype).reshape(a.shape)
    out[...] = a
    return out, buf

r = np.random.default_rng(0)
for path in %r:
    assert llm._fastops.lib.fo_set_isa(path.encode()) == 0
    for M, N, K in ((1, 17, 64), (3, 13, 33), (7, 18, 16), (16, 5, 7), (40, 33, 70), (17, 20, 9), (25, 40, 33),
                    (130, 9, 7)):
        x, keep0 = at_page_end(r.standard_normal((M, K)).astype(np.float32))
        wt, keep = at_page_end(r.standard_normal((N, K)).astype(np.float32))    # as the tied head's wte
        w, keep2 = at_page_end(r.standard_normal((K, N)).astype(np.float32))
        dy, keep3 = at_page_end(r.standard_normal((M, N)).astype(np.float32))
        for weight in (wt.T, w):
            np.testing.assert_allclose(llm.fo_linear_forward(x, weight, None), x @ weight.astype(np.float64),
                                       rtol=1e-4, atol=1e-4)
            dx, dw, db = llm.fo_linear_backward(dy, x, weight)
            np.testing.assert_allclose(dx, dy @ weight.T.astype(np.float64), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(dw, x.T @ dy.astype(np.float64), rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_the_products_never_read_past_their_operands():
    """Every operand flush against an unreadable page (weights, inputs, the
    gradient dy): a kernel that reads rows past the end (and throws them
    away: the results stay right) is killed."""
    import subprocess
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("mprotect through ctypes: Linux")
    r = subprocess.run([sys.executable, "-c", GUARDED % (ISAS,)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stderr[-2000:])


@FAST
@given(B=st.integers(1, 3), H=st.integers(1, 3), T=T_SIZES, D=D_SIZES, pad=st.integers(0, 5),
       path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
@example(B=1, H=1, T=300, D=64, pad=3, path=ISAS[0], seed=0)  # few heads: dq per-thread copies
@example(B=4, H=4, T=70, D=32, pad=0, path=ISAS[0], seed=0)   # many heads: one task per head
@example(B=1, H=2, T=2, D=1, pad=0, path=ISAS[0], seed=0)     # D = 1: strides numpy may choose freely
def test_attention_reads_heads_where_the_model_keeps_them(B, H, T, D, pad, path, seed):
    """q, k, v as views of c_attn's output rows (B, T, 3C, with `pad` more
    floats per row), dy as a view of c_proj's (B, T, C): the kernels read
    them in place and give the same bits as on packed (B, H, T, D) copies,
    y laid out as c_proj reads it (heads side by side), the gradients as
    c_attn's backward reads them: views of one (B, T, 3, H, D) array, which
    join_heads hands on without a copy (with padded rows: packed)."""
    rng = np.random.default_rng(seed)
    rows = randn(rng, B, T, 3 * H * D + pad)
    q, k, v = rows[..., :3 * H * D].reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)
    dy = randn(rng, B, T, H, D).transpose(0, 2, 1, 3)
    with isa(path):
        y, lse = llm.fo_attention_forward(q, k, v)
        grads = llm.fo_attention_backward(dy, q, k, v, y, lse)
        packed = [np.ascontiguousarray(a) for a in (q, k, v)]
        y2, lse2 = llm.fo_attention_forward(*packed)
        grads2 = llm.fo_attention_backward(np.ascontiguousarray(dy), *packed, np.ascontiguousarray(y2), lse2)
    assert y.transpose(0, 2, 1, 3).flags.c_contiguous                  # (B, T, H, D) in memory
    dqkv = llm.ops.join_heads(*grads)
    if pad == 0:
        assert dqkv is grads[0].base and dqkv.flags.c_contiguous        # (B, T, 3, H, D), not copied
    else:
        assert all(g.flags.c_contiguous for g in grads)
    assert all(g.flags.c_contiguous for g in grads2)                    # as the packed q, k, v passed in
    np.testing.assert_array_equal(dqkv, np.stack([g.transpose(0, 2, 1, 3) for g in grads], axis=2))
    for got, want in zip((y, lse, *grads), (y2, lse2, *grads2)):
        np.testing.assert_array_equal(got, want)
    close(y, attention_reference(q, k, v, dy)[0], D)



def test_attention_copies_views_whose_strides_are_not_whole_floats():
    """A field of a structured array: rows 18 bytes apart, each contiguous.
    The kernels count strides in floats, so it is copied (it was read at
    18 // 4 floats: NaN, or 1e35)."""
    rec = np.zeros((1, 2, 5), dtype=[("a", "<f4", (4,)), ("pad", "<i2")])
    rec["a"] = randn(np.random.default_rng(0), 1, 2, 5, 4)
    q, packed = rec["a"], rec["a"].copy()
    assert q.strides == (180, 90, 18, 4)
    y, lse = llm.fo_attention_forward(q, q, q)
    want = llm.fo_attention_forward(packed, packed, packed)
    for got, ref in zip((y, lse, *llm.fo_attention_backward(q, q, q, q, y, lse)),
                        (*want, *llm.fo_attention_backward(packed, packed, packed, packed, *want))):
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(llm.fo_attention_decode(q[:, :, 3:], q, q),
                                  llm.fo_attention_decode(packed[:, :, 3:], packed, packed))


def child_output(script, **env):
    """What `script` prints, run by a fresh Python with these environment variables."""
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True,
                          text=True, env={**os.environ, **env}).stdout


# The threads share out the weight gradients' columns (a k block at a time)
# and attention's heads as they come free; each C tile sums its k blocks in
# order and each head is one thread's, so any number of threads gives the
# same bits. Three on a 2-core machine take turns: the shares move.
THREADS_CHECK = """
import hashlib, numpy as np, llm
llm.set_backend("fastops")
rng = np.random.default_rng(0)
r = lambda *shape: rng.standard_normal(shape, np.float32)
out = []
for M, K, N in [(700, 130, 300), (600, 500, 40)]:     # C = x^T dy split by columns; by rows
    out += llm.fo_linear_backward(r(M, N), r(M, K), r(K, N))
q, k, v = r(4, 130, 3, 3, 32).transpose(2, 0, 3, 1, 4)    # 12 whole heads, read in place
y, lse = llm.fo_attention_forward(q, k, v)
out += [y, lse, *llm.fo_attention_backward(r(4, 130, 3, 32).transpose(0, 2, 1, 3), q, k, v, y, lse)]
print(hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in out)).hexdigest())
"""


def test_products_and_attention_give_the_same_bits_on_any_number_of_threads():
    one = child_output(THREADS_CHECK, OMP_NUM_THREADS="1")
    assert len(one) == 65
    assert child_output(THREADS_CHECK, OMP_NUM_THREADS="2") == one
    assert child_output(THREADS_CHECK, OMP_NUM_THREADS="3") == one


# OpenMP may give a parallel region fewer threads than asked for (here
# OMP_THREAD_LIMIT; also OMP_DYNAMIC, nesting): the kernels that keep a sum
# per thread (LayerNorm's dw and db; attention's dQ with few heads, one copy
# a thread) then sum the team's, the result of asking for that many. They
# once summed as many as asked for, the missing ones never zeroed: with the
# freed NaNs below, the gradients came out NaN.
TEAM_CHECK = """
import hashlib, numpy as np, llm
llm.set_backend("fastops")
junk = [np.full(1 << 20, np.nan, np.float32) for _ in range(8)]; del junk
cfg = llm.GPTConfig(n_layer=1, n_head=1, n_embd=64, block_size=256, vocab_size=300, dtype="float32")
model, rng = llm.GPT(cfg, seed=0), np.random.default_rng(0)
model.forward(rng.integers(0, 300, (2, 256)), rng.integers(0, 300, (2, 256)))   # 2 heads: split
grads = model.backward()
assert all(np.isfinite(g).all() for g in grads.values())
print(hashlib.sha256(b"".join(np.ascontiguousarray(grads[k]).tobytes() for k in sorted(grads))).hexdigest())
"""


def test_fewer_threads_than_asked_for_give_the_team_s_result():
    assert (child_output(TEAM_CHECK, OMP_NUM_THREADS="2", OMP_THREAD_LIMIT="1")
            == child_output(TEAM_CHECK, OMP_NUM_THREADS="1"))
    assert (child_output(TEAM_CHECK, OMP_NUM_THREADS="3", OMP_THREAD_LIMIT="2")
            == child_output(TEAM_CHECK, OMP_NUM_THREADS="2"))


@FAST
@given(T=T_SIZES, D=D_SIZES, seed=st.integers(0, 2**16))
def test_attention_is_a_convex_combination_of_past_values(T, D, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (randn(rng, 1, 2, T, D) * 3 for _ in range(3))
    y, _ = llm.fo_attention_forward(q, k, v)
    lo = np.minimum.accumulate(v, axis=2)       # min/max of v over positions <= t
    hi = np.maximum.accumulate(v, axis=2)
    assert np.all(y >= lo - 1e-5) and np.all(y <= hi + 1e-5)
    np.testing.assert_array_equal(y[:, :, 0], v[:, :, 0])     # t = 0 sees only itself


@FAST
@given(T=st.integers(2, 150), D=D_SIZES, data=st.data())
def test_attention_is_causal(T, D, data):
    """Changing tokens after t0 never changes the outputs at t <= t0 (bit for bit)."""
    t0 = data.draw(st.integers(0, T - 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    q, k, v = (randn(rng, 2, 1, T, D) for _ in range(3))
    y, lse = llm.fo_attention_forward(q, k, v)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[:, :, t0 + 1:] = randn(rng, 2, 1, T - t0 - 1, D) * 5
    y2, lse2 = llm.fo_attention_forward(q2, k2, v2)
    np.testing.assert_array_equal(y2[:, :, :t0 + 1], y[:, :, :t0 + 1])
    np.testing.assert_array_equal(lse2[:, :, :t0 + 1], lse[:, :, :t0 + 1])


@FAST
@given(B=st.integers(1, 3), H=st.integers(1, 3), Tq=st.integers(1, 4), past=st.sampled_from([1, 2, 15, 16, 17, 63, 200]),
       D=D_SIZES, room=st.integers(0, 3), path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
@example(B=16, H=12, Tq=1, past=57, D=64, room=7, path=ISAS[0], seed=0)    # GPT-2 124M, batch 16
def test_attention_with_a_kv_cache_matches_float64_reference(B, H, Tq, past, D, room, path, seed):
    """Generation: the new positions' queries (views of c_attn's rows) against
    the keys and values a KVCache holds (views of storage with room for more);
    query i sees the past and the new positions up to itself."""
    rng = np.random.default_rng(seed)
    Tk = past + Tq
    q = randn(rng, B, Tq, 3, H, D)[:, :, 0].transpose(0, 2, 1, 3)
    k, v = (randn(rng, B, H, Tk + room, D)[:, :, :Tk] for _ in range(2))
    with isa(path):
        y = llm.fo_attention_decode(q, k, v)
    assert y.transpose(0, 2, 1, 3).flags.c_contiguous                  # (B, Tq, H, D): as c_proj reads it
    close(y, llm.attention_forward(*(a.astype(np.float64) for a in (q, k, v)))[0], max(D, Tk))
    with pytest.raises(ValueError, match="k: expected shape"):
        llm.fo_attention_decode(q, k[:, :, :Tq - 1], v[:, :, :Tq - 1])


@FAST
@given(L=st.integers(1, 3), H=st.integers(1, 4), D=st.sampled_from([1, 2, 3, 5, 8, 16, 17]), V=st.integers(1, 70),
       B=st.sampled_from([1, 2, 3, 5, 16, 17]), prompt=st.integers(1, 6), new=st.integers(1, 20),
       path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
@example(L=1, H=12, D=64, V=700, B=1, prompt=10, new=3, path=ISAS[0], seed=0)     # GPT-2's width
@example(L=1, H=12, D=64, V=700, B=16, prompt=10, new=3, path=ISAS[0], seed=0)
def test_tokens_in_one_call_are_next_logits_tokens_bit_for_bit(L, H, D, V, B, prompt, new, path, seed):
    """Generation: fo_decode_token, the whole model in one call for a new
    token of each of B rows, gives next_logits' logits (fastops' kernels from
    Python) bit for bit, token after token, as the KV cache fills and grows,
    to the window's end."""
    rng = np.random.default_rng(seed)
    model = llm.GPT(llm.GPTConfig(n_layer=L, n_head=H, n_embd=H * D, block_size=prompt + new, vocab_size=V),
                    seed=seed)
    model.params = {k: a * np.float32(rng.uniform(1, 30)) for k, a in model.params.items()}  # not all ~0
    ids = rng.integers(0, V, (B, prompt + new))
    kv, kv_ref = llm.KVCache(), llm.KVCache()
    with isa(path):
        np.testing.assert_array_equal(llm.next_logits(model, ids[:, :prompt], kv),
                                      llm.next_logits(model, ids[:, :prompt], kv_ref))
        for t in range(prompt, prompt + new):
            np.testing.assert_array_equal(llm.fo_decode_token(model, kv, ids[:, t]),
                                          llm.next_logits(model, ids[:, t:t + 1], kv_ref))
    assert kv.n == kv_ref.n == [prompt + new] * L
    for a, b in zip(kv.k + kv.v, kv_ref.k + kv_ref.v):
        np.testing.assert_array_equal(a[:, :, :prompt + new], b[:, :, :prompt + new])


def test_generation_runs_its_new_tokens_in_one_call_where_it_applies(monkeypatch):
    calls, one_call = [], llm.fo_decode_token
    monkeypatch.setattr(llm, "fo_decode_token", lambda *a: calls.append(1) or one_call(*a))
    model = llm.GPT(llm.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11), seed=0)
    # 6 tokens in one call each, then past the window's end: every token from the whole window
    assert len(list(llm.generate(model, [1, 2], 10, temperature=0))) == 10 and len(calls) == 6
    copy.deepcopy(model)                           # (RLHF copies its policy: nothing uncopyable kept on it)
    calls.clear()
    outs, _ = llm.generate_batch(model, [[1, 2], [3, 4], [5, 6]], 3)                # 3 rows at once
    assert len(calls) == 2 and outs == [list(llm.generate(model, p, 3, temperature=0)) for p in ([1, 2], [3, 4], [5, 6])]
    calls.clear()
    llm.ops.next_logits(model, [[1, 2]], kv := llm.KVCache(maps=[]))    # attention maps kept
    llm.ops.next_logits(model, [[3]], kv)
    assert not calls
    with pytest.raises(ValueError, match="tokens: expected a 1-D array of ids"):
        llm.fo_decode_token(model, kv, [[3]])
    with pytest.raises(ValueError, match="idx: token ids must be in 0..10, got 11"):
        llm.ops.next_logits(model, [[11]], llm.KVCache())
    kv = llm.KVCache()
    llm.ops.next_logits(model, [[1, 2]], kv)
    with pytest.raises(ValueError, match="idx: token ids must be in 0..10, got 11"):
        llm.ops.next_logits(model, [[11]], kv)
    with pytest.raises(ValueError, match="kv: expected 2 layers"):
        llm.fo_decode_token(model, llm.KVCache(), 1)
    llm.add_lora(model, r=2)                       # adapters beside their weights: from Python, with them
    for name in [n for n in model.params if n.endswith(".lora_B")]:
        model.params[name] = randn(np.random.default_rng(0), *model.params[name].shape)
    calls.clear()
    with_lora = list(llm.generate(model, [1, 2], 5, temperature=0))
    assert not calls and with_lora == [int(np.argmax(llm.next_logits(model, [[1, 2] + with_lora[:i]],
                                                                     llm.KVCache())[0])) for i in range(5)]


# ---- GELU and LayerNorm ------------------------------------------------------------

N_SIZES = st.sampled_from([1, 2, 3, 7, 13, 15, 16, 17, 31, 97, 511, 512, 513, 1000, 4099,
                           65537, 100003])
C_SIZES = st.sampled_from([1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 64, 97, 128, 129, 384, 769])


@FAST
@given(n=N_SIZES, scale=st.sampled_from([0.01, 1.0, 4.0, 30.0]), path=st.sampled_from(ISAS),
       seed=st.integers(0, 2**16))
@example(n=12 * 64 * 512, scale=1.0, path=ISAS[0], seed=0)     # the small model's MLP
def test_gelu_matches_float64_reference(n, scale, path, seed):
    rng = np.random.default_rng(seed)
    x, dy = randn(rng, n) * np.float32(scale), randn(rng, n)
    with isa(path):
        y = llm.fo_gelu_forward(x)
        dx = llm.fo_gelu_backward(dy, x)
    y_ref, dx_ref = gelu_reference(x, dy)
    assert y.dtype == dx.dtype == np.float32 and y.shape == dx.shape == (n,)
    # ~1e-6 absolute, or half an ulp of y where |y| is large (y ~ x for x >> 1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=2e-6)


def test_gelu_extremes_and_shapes():
    x = np.array([-1e30, -1e4, -100, -20, -9.5, -1e-30, 0, 1e-30, 9.5, 20, 100, 1e4, 1e30],
                 np.float32)
    y = llm.fo_gelu_forward(x)
    dx = llm.fo_gelu_backward(np.ones_like(x), x)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    y_ref, dx_ref = gelu_reference(x, np.ones_like(x))
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=2e-6)
    x3 = randn(np.random.default_rng(0), 3, 5, 7)
    y3, c3 = llm.ops.gelu_forward(x3)                   # the layer table: the kernel, 3-D kept
    assert isinstance(c3, llm._Kernel) and y3.shape == x3.shape
    np.testing.assert_allclose(llm.ops.gelu_backward(x3, c3), gelu_reference(x3, x3)[1],
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("path", ISAS)
def test_gelu_of_a_huge_negative_input_is_minus_zero(path):
    """exp(2u) is clamped at e^-87: times x, that gave -1.6e-3 at x = -1e35
    and -4.9 at -3e38 (the reference, and the limit: -0)."""
    x = np.array([-1e31, -1e35, -3e38, -np.finfo(np.float32).max, -np.inf], np.float32)
    with isa(path):
        y, dx = llm.fo_gelu_forward(x), llm.fo_gelu_backward(np.ones_like(x), x)
    assert (y == 0).all() and np.signbit(y).all() and (np.abs(dx) < 1e-30).all()
    with np.errstate(over="ignore"):                    # (x^3 overflows, and tanh(-inf) is -1)
        np.testing.assert_array_equal(y[:-1], llm.gelu_forward(x[:-1])[0])


@FAST
@given(M=st.sampled_from([1, 2, 3, 7, 17, 64, 97, 768, 1031]), C=C_SIZES,
       shift=st.sampled_from([0.0, 3.0]), path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
@example(M=768, C=128, shift=0.0, path=ISAS[0], seed=0)      # the small model
@example(M=2048, C=384, shift=0.0, path=ISAS[0], seed=1)     # the large model
@example(M=1031, C=769, shift=0.0, path=ISAS[0], seed=2)     # threads' shares of odd M, odd C
def test_layernorm_matches_float64_reference(M, C, shift, path, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, M, C) + np.float32(shift)
    w, b, dy = randn(rng, C), randn(rng, C), randn(rng, M, C)
    with isa(path):
        y, mean, rstd = llm.fo_layernorm_forward(x, w, b)
        dx, dw, db = llm.fo_layernorm_backward(dy, x, w, mean, rstd)
    y_ref, mu_ref, rstd_ref, dx_ref, dw_ref, db_ref = layernorm_reference(x, w, b, dy)
    np.testing.assert_allclose(mean, mu_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-4, atol=1e-5)
    close(y, y_ref, C)
    # dx = rstd * (O(1) terms that cancel): rstd can be ~1/sqrt(eps) (rows of
    # nearly equal values, e.g. C = 2), so compare dx / rstd
    close(dx / rstd_ref[:, None], dx_ref / rstd_ref[:, None], C)
    close(dw, dw_ref, M)
    close(db, db_ref, M)


# ---- bad input: a clear error naming the argument, or a copy; never a crash ------

def test_bad_input_raises_or_copies():
    rng = np.random.default_rng(0)
    x, w, b = randn(rng, 5, 4), randn(rng, 4, 3), randn(rng, 3)
    with pytest.raises(TypeError, match="x"):
        llm.fo_linear_forward(x.astype(np.float64), w, b)
    with pytest.raises(TypeError, match="w"):
        llm.fo_linear_forward(x, w.tolist(), b)
    with pytest.raises(ValueError, match="w"):
        llm.fo_linear_forward(x, randn(rng, 5, 3), b)
    with pytest.raises(ValueError, match="b"):
        llm.fo_linear_forward(x, w, randn(rng, 4))
    with pytest.raises(ValueError, match="x"):
        llm.fo_linear_forward(randn(rng, 5, 4, 1), w, b)
    with pytest.raises(ValueError, match="dy"):
        llm.fo_linear_backward(randn(rng, 5, 2), x, w)
    with pytest.raises(TypeError, match="dy"):
        llm.fo_linear_backward(randn(rng, 5, 3).astype(np.float16), x, w)
    # non-contiguous inputs are copied, and the answer is still right
    big = randn(rng, 10, 8)
    xs, ws = big[::2, ::2], randn(rng, 8, 6)[::2, ::2]
    close(llm.fo_linear_forward(xs, ws, b), xs.astype(np.float64) @ ws + b, 4)
    dx, dw, db = llm.fo_linear_backward(randn(rng, 5, 6)[:, ::2], xs, ws)
    assert dx.shape == (5, 4) and dw.shape == (4, 3) and db.shape == (3,)

    q = randn(rng, 1, 2, 5, 4)
    with pytest.raises(ValueError, match="k"):
        llm.fo_attention_forward(q, randn(rng, 1, 2, 6, 4), q)
    with pytest.raises(ValueError, match="q"):
        llm.fo_attention_forward(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="v"):
        llm.fo_attention_forward(q, q, q.astype(np.float64))
    y, lse = llm.fo_attention_forward(q, q, q)
    with pytest.raises(ValueError, match="dy"):
        llm.fo_attention_backward(randn(rng, 1, 2, 5, 3), q, q, q, y, lse)
    with pytest.raises(TypeError, match="x"):
        llm.fo_gelu_forward(q.astype(np.float64))
    with pytest.raises(TypeError, match="x"):
        llm.fo_gelu_forward([1.0, 2.0])
    with pytest.raises(ValueError, match="dy"):
        llm.fo_gelu_backward(q[..., :3], q)
    xl = randn(rng, 6, 4)
    with pytest.raises(ValueError, match="w"):
        llm.fo_layernorm_forward(xl, randn(rng, 5), randn(rng, 4))
    with pytest.raises(TypeError, match="b"):
        llm.fo_layernorm_forward(xl, randn(rng, 4), randn(rng, 4).astype(np.float64))
    wl4 = randn(rng, 4)
    _, mean, rstd = llm.fo_layernorm_forward(xl, wl4, randn(rng, 4))
    with pytest.raises(ValueError, match="dy"):
        llm.fo_layernorm_backward(randn(rng, 6, 3), xl, wl4, mean, rstd)
    xls = randn(rng, 6, 8)[:, ::2]                     # non-contiguous: copied
    wl, bl = randn(rng, 4), randn(rng, 4)
    close(llm.fo_layernorm_forward(xls, wl, bl)[0],
          layernorm_reference(xls, wl, bl, xls)[0], 4)
    qs = randn(rng, 1, 2, 5, 8)[..., ::2]              # non-contiguous: copied
    ys, _ = llm.fo_attention_forward(qs, qs, qs)
    close(ys, attention_reference(qs, qs, qs, qs)[0], 4)


def test_float64_and_backend_switch_use_numpy():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))
    y, cache = llm.ops.linear_forward(x, w, None)
    assert y.dtype == np.float64 and not isinstance(cache, llm._Kernel)   # NumPy path
    with pytest.raises(ValueError, match="backend"):
        llm.set_backend("cuda")
    prev = llm.set_backend("numpy")
    try:
        _, cache = llm.ops.attention_forward(*(randn(rng, 1, 1, 4, 2) for _ in range(3)))
        assert not isinstance(cache, llm._Kernel)                    # NumPy's cache
    finally:
        llm.set_backend(prev)
    _, cache = llm.ops.attention_forward(*(randn(rng, 1, 1, 4, 2) for _ in range(3)))
    assert isinstance(cache, llm._Kernel)


# ---- the whole model: fastops and NumPy agree ------------------------------------

@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("n_layer,n_head,n_embd,block_size,T", [(2, 2, 32, 16, 16), (1, 3, 48, 80, 70)])
def test_model_loss_and_grads_match_numpy(n_layer, n_head, n_embd, block_size, T, masked):
    cfg = llm.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                        vocab_size=67, dtype="float32")
    model = llm.GPT(cfg, seed=1)
    rng = np.random.default_rng(2)
    idx, tgt = rng.integers(0, 67, (3, T)), rng.integers(0, 67, (3, T))
    mask = (rng.random((3, T)) < 0.4).astype(np.float32) if masked else None   # SFT's: answer tokens only
    runs = {}
    prev = llm.set_backend("numpy")
    try:
        for backend in ("numpy", "fastops"):
            llm.set_backend(backend)
            logits, loss = model.forward(idx, tgt, mask)
            runs[backend] = (logits, loss, model.backward())
    finally:
        llm.set_backend(prev)
    (l_np, loss_np, g_np), (l_fo, loss_fo, g_fo) = runs["numpy"], runs["fastops"]
    assert math.isclose(loss_np, loss_fo, rel_tol=1e-5)
    np.testing.assert_allclose(l_fo, l_np, rtol=1e-4, atol=1e-5)
    assert g_np.keys() == g_fo.keys()
    for name in g_np:
        assert g_fo[name].dtype == np.float32, name
        scale = np.abs(g_np[name]).max() + 1e-12
        np.testing.assert_allclose(g_fo[name] / scale, g_np[name] / scale, atol=1e-4, err_msg=name)


def test_linear_backward_input_matches_numpy():
    r = np.random.default_rng(4)
    dy, w = r.normal(size=(37, 19)).astype(np.float32), r.normal(size=(23, 19)).astype(np.float32)
    assert np.allclose(llm.fo_linear_backward_input(dy, w), dy @ w.T, atol=1e-4)
    assert np.allclose(llm.fo_linear_backward_input(dy, np.asfortranarray(w)), dy @ w.T, atol=1e-4)
    with pytest.raises(ValueError, match="w"):
        llm.fo_linear_backward_input(dy, w[:, :5])



# Every allocation under 18,000 bytes fails: the small shapes below fail at a
# kernel's first (shared) buffer, the larger ones (x2, k2, q2) get that one
# and fail at the per-thread buffers inside the parallel region.
OOM_MALLOC = "-DFO_MALLOC(n)=((n)>=18000?malloc(n):NULL)"     # (build_ext splits on spaces)
OOM_CHECK = """
import numpy as np, llm
assert llm._fastops is not None
r = np.random.default_rng(0)
f32 = lambda *s: r.standard_normal(s).astype(np.float32)
x, w, b, dy, x2, w2 = f32(64, 32), f32(32, 48), f32(48), f32(64, 48), f32(64, 300), f32(300, 100)
q, q2 = f32(2, 2, 70, 16), f32(1, 64, 80, 16)
back = lambda q: llm.fo_attention_backward(q, q, q, q, q, np.zeros(q.shape[:3], np.float32))
ln = lambda: llm.fo_layernorm_backward(x, x, x[0], np.zeros(64, np.float32), np.ones(64, np.float32))
steps = {"linear forward": lambda: llm.ops.linear_forward(x, w, b),
         "linear backward": lambda: llm.fo_linear_backward(dy, x, w),
         "linear forward, per-thread buffer": lambda: llm.ops.linear_forward(x2, w2, None),
         "attention forward": lambda: llm.ops.attention_forward(q, q, q),
         "attention backward": lambda: back(q),
         "attention backward, per-thread buffers": lambda: back(q2),
         "layernorm backward": ln}
for name, step in steps.items():
    try:
        step()
        print(name, "returned")
    except MemoryError as e:
        print(name, "MemoryError:", e)
"""


def test_out_of_memory_in_a_kernel_is_an_error_not_a_crash(tmp_path):
    """fastops built with a malloc that fails (-DFO_MALLOC): each kernel that
    cannot get its scratch memory raises MemoryError, and nothing crashes."""
    import os
    import shutil
    import subprocess
    import sys
    if llm._fastops is None:
        pytest.skip("fastops is not built")
    for name in ("fastops.c", "build_ext.py", "llm.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    env = {**os.environ, "FO_EXTRA_CFLAGS": OOM_MALLOC}
    env.pop("LLM_NUMPY", None)
    build = subprocess.run([sys.executable, "build_ext.py"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", OOM_CHECK], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 7 and all("MemoryError: fastops: out of memory" in l for l in lines), r.stdout


# ---- the optimizer: gradient norm and AdamW in one C pass each ------------------

SIZES = st.lists(st.sampled_from([(1,), (3,), (17,), (1, 1), (5, 7), (16, 33), (129, 65),
                                  (300, 301), (70001,)]), min_size=1, max_size=6)


@FAST
@given(shapes=SIZES, path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_grad_sumsq_matches_float64(shapes, path, seed):
    rng = np.random.default_rng(seed)
    grads = {f"g{i}": randn(rng, *s) * np.float32(10.0 ** rng.integers(-3, 3))
             for i, s in enumerate(shapes)}
    ref = sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())
    with isa(path):
        assert math.isclose(llm.fo_grad_sumsq(grads), ref, rel_tol=1e-5)
    assert llm.fo_grad_sumsq(list(grads.values())) == llm.fo_grad_sumsq(grads)


@pytest.mark.parametrize("path", ISAS)
def test_grad_sumsq_of_squares_past_float32_s_range_or_of_millions(path):
    """Squares beyond float32's largest (a gradient of 1e20) are summed in
    float64, as sum_of_squares does: not inf, which would make clipping
    zero the step. And 4 million values are summed to float64's accuracy."""
    big = [np.full(5, 1e20, np.float32), np.ones(3, np.float32)]
    rng = np.random.default_rng(0)
    many = randn(rng, 1 << 22)
    with isa(path):
        assert math.isclose(llm.fo_grad_sumsq(big), 5e40, rel_tol=1e-6)
        assert math.isclose(llm.fo_grad_sumsq([many]), float((many.astype(np.float64) ** 2).sum()), rel_tol=1e-7)


def adamw_reference(p, g, m, v, decay, lr, b1, b2, eps, wd, t, gscale):
    p, g, m, v = (a.astype(np.float64) for a in (p, g, m, v))
    g = g * gscale
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    if decay:
        p = p * (1 - lr * wd)
    return p - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps), m, v


@FAST
@given(shapes=SIZES, t=st.sampled_from([1, 2, 10, 1000]), gscale=st.sampled_from([1.0, 0.37]),
       path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
def test_adamw_matches_float64_reference(shapes, t, gscale, path, seed):
    rng = np.random.default_rng(seed)
    names = [f"w{i}" for i in range(len(shapes))]
    params = {k: randn(rng, *s) for k, s in zip(names, shapes)}
    grads = {k: randn(rng, *s) for k, s in zip(names, shapes)}
    m = {k: randn(rng, *s) * np.float32(0.1) for k, s in zip(names, shapes)}
    v = {k: np.abs(randn(rng, *s)) * np.float32(0.01) for k, s in zip(names, shapes)}
    decay = {k: params[k].ndim >= 2 for k in names}
    ref = {k: adamw_reference(params[k], grads[k], m[k], v[k], decay[k], 1e-2, 0.9, 0.95, 1e-8,
                              0.1, t, gscale) for k in names}
    with isa(path):
        llm.fo_adamw_step(params, grads, m, v, decay, 1e-2, (0.9, 0.95), 1e-8, 0.1, t, gscale)
    for k in names:
        for got, want in zip((params[k], m[k], v[k]), ref[k]):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=k)


def test_adamw_equals_llm_adamw_step():
    """The C pass and llm.AdamW.step (NumPy, float32) take the same step,
    clipping included, to float32 rounding."""
    rng = np.random.default_rng(3)
    model = llm.GPT(llm.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    ref_params = {k: p.copy() for k, p in model.params.items()}
    opt = llm.AdamW(lr=1e-2)
    m, v = {}, {}
    for step in range(1, 4):
        grads = {k: randn(rng, *p.shape) for k, p in model.params.items()}
        g_np = {k: g.copy() for k, g in grads.items()}
        prev = llm.set_backend("numpy")               # (the tests run every kernel: the reference is NumPy's)
        try:
            norm = opt.step(ref_params, g_np, max_norm=1.0)
        finally:
            llm.set_backend(prev)
        fo_norm = math.sqrt(llm.fo_grad_sumsq(grads))
        assert math.isclose(fo_norm, norm, rel_tol=1e-6)
        for k, p in model.params.items():
            m.setdefault(k, np.zeros_like(p)), v.setdefault(k, np.zeros_like(p))
        llm.fo_adamw_step(model.params, grads, m, v, {k: p.ndim >= 2 for k, p in model.params.items()},
                          opt.lr, opt.betas, opt.eps, opt.weight_decay, step,
                          gscale=min(1.0, 1.0 / (fo_norm + 1e-6)))
    for k in ref_params:
        np.testing.assert_allclose(model.params[k], ref_params[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_optimizer_bad_input():
    p = {"w": np.zeros((3, 4), np.float32)}
    g = {"w": np.ones((3, 4), np.float32)}
    mv = lambda: ({"w": np.zeros((3, 4), np.float32)}, {"w": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match=r"grads\['w'\]"):
        llm.fo_adamw_step(p, {"w": np.ones((4, 3), np.float32)}, *mv(), {"w": True}, 1e-3,
                          (0.9, 0.95), 1e-8, 0.1, 1)
    m, v = mv()
    with pytest.raises(TypeError, match=r"m\['w'\]"):
        llm.fo_adamw_step(p, g, {"w": m["w"].astype(np.float64)}, v, {"w": True}, 1e-3,
                          (0.9, 0.95), 1e-8, 0.1, 1)
    with pytest.raises(ValueError, match=r"v\['w'\]"):
        llm.fo_adamw_step(p, g, m, {"w": np.zeros((4, 3), np.float32).T}, {"w": True}, 1e-3,
                          (0.9, 0.95), 1e-8, 0.1, 1)
    with pytest.raises(ValueError, match=r"params\['w'\]"):
        llm.fo_adamw_step({"w": np.zeros((4, 3), np.float32).T}, g, m, v, {"w": True}, 1e-3,
                          (0.9, 0.95), 1e-8, 0.1, 1)
    with pytest.raises(TypeError, match=r"grads\['w'\]"):
        llm.fo_grad_sumsq({"w": g["w"].astype(np.float16)})
    for name in ("params", "m", "v", "decay"):                # (a bare KeyError)
        args = {"params": p, "m": mv()[0], "v": mv()[1], "decay": {"w": True}, name: {}}
        with pytest.raises(ValueError, match=f"{name}: .*'w'"):
            llm.fo_adamw_step(args["params"], g, args["m"], args["v"], args["decay"], 1e-3, (0.9, 0.95), 1e-8, 0.1, 1)
    assert llm.fo_grad_sumsq({}) == 0.0


# ---- softmax with cross-entropy, fused -----------------------------------------

@FAST
@given(M=st.sampled_from([1, 2, 7, 64, 257]), V=st.sampled_from([1, 2, 3, 17, 31, 260, 1000, 50257]),
       scale=st.sampled_from([0.1, 3.0, 40.0]), weighted=st.booleans(), path=st.sampled_from(ISAS),
       seed=st.integers(0, 2**16), shift=st.sampled_from([0.0, -100.0]))
@example(M=64, V=17, scale=3.0, weighted=False, path=ISAS[0], seed=0, shift=-100.0)   # every logit far below 0
def test_cross_entropy_matches_float64_reference(M, V, scale, weighted, path, seed, shift):
    if M * V > 3_000_000:
        M = 3
    rng = np.random.default_rng(seed)
    logits = randn(rng, M, V) * np.float32(scale) + np.float32(shift)
    targets = rng.integers(0, V, M)
    w = rng.random(M).astype(np.float32) if weighted else None
    with isa(path):
        loss, d = llm.fo_cross_entropy(logits, targets, w, dscale=0.5)
    x = logits.astype(np.float64)
    z = x - x.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    ref_loss = -logp[np.arange(M), targets]
    ref_d = np.exp(logp)
    ref_d[np.arange(M), targets] -= 1
    ref_d *= (np.ones(M) if w is None else w)[:, None] * 0.5
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5 * (1 + math.log(V)))
    np.testing.assert_allclose(d, ref_d, rtol=1e-4, atol=1e-7)


def test_cross_entropy_equals_llm_cross_entropy():
    rng = np.random.default_rng(0)
    logits, targets = randn(rng, 3, 5, 67), rng.integers(0, 67, (3, 5))
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    prev = llm.set_backend("numpy")
    try:
        loss_ref, cache = llm.cross_entropy_forward(logits, targets, mask)
        d_ref = llm.cross_entropy_backward(cache)
    finally:
        llm.set_backend(prev)
    n = max(mask.sum(), 1)
    loss, d = llm.fo_cross_entropy(logits.reshape(15, 67), targets.reshape(15), mask.reshape(15),
                                   dscale=1 / n)
    assert math.isclose(float((loss * mask.reshape(15)).sum() / n), float(loss_ref), rel_tol=1e-5)
    np.testing.assert_allclose(d.reshape(3, 5, 67), d_ref, rtol=1e-4, atol=1e-7)


def test_cross_entropy_bad_input():
    x = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="targets"):
        llm.fo_cross_entropy(x, np.array([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="targets"):
        llm.fo_cross_entropy(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="targets"):
        llm.fo_cross_entropy(x, np.array([0.0, 1, 2, 3]))
    with pytest.raises(ValueError, match="weights"):
        llm.fo_cross_entropy(x, np.array([0, 1, 2, 3]), np.ones(3, np.float32))
    with pytest.raises(TypeError, match="logits"):
        llm.fo_cross_entropy(x.astype(np.float64), np.array([0, 1, 2, 3]))


# ---- the token embedding's backward -------------------------------------------------

@FAST
@given(V=st.sampled_from([1, 2, 5, 260, 1844]), C=DIMS, B=st.sampled_from([1, 3, 16]),
       T=st.sampled_from([1, 7, 64]), path=st.sampled_from(ISAS), seed=st.integers(0, 2**16))
@example(V=2, C=192, B=16, T=64, path=ISAS[0], seed=0)              # every token repeated hundreds of times
def test_embedding_backward_equals_numpy_add_at_bit_for_bit(V, C, B, T, path, seed):
    """The same additions in the same order (position by position) as
    numpy.add.at: the same bits, however often a token repeats."""
    rng = np.random.default_rng(seed)
    dwte, idx, dx = randn(rng, V, C), rng.integers(0, V, (B, T)), randn(rng, B, T, C)
    ref = dwte.copy()
    np.add.at(ref, idx, dx)
    with isa(path):
        out = llm.fo_embedding_backward(dwte, idx, dx)
    assert out is dwte                                  # in place
    assert np.array_equal(out, ref)


def test_embedding_backward_bad_input():
    w, dx = np.zeros((5, 3), np.float32), np.ones((2, 4, 3), np.float32)
    with pytest.raises(ValueError, match="idx"):
        llm.fo_embedding_backward(w, np.full((2, 4), 5), dx)
    with pytest.raises(ValueError, match="idx"):
        llm.fo_embedding_backward(w, np.full((2, 4), -1), dx)
    with pytest.raises(ValueError, match="idx"):
        llm.fo_embedding_backward(w, np.zeros((2, 4)), dx)
    with pytest.raises(ValueError, match="dx"):
        llm.fo_embedding_backward(w, np.zeros((2, 3), np.int64), dx)
    with pytest.raises(ValueError, match="dwte"):
        llm.fo_embedding_backward(np.zeros((5, 6), np.float32)[:, ::2], np.zeros((2, 4), np.int64), dx)
    with pytest.raises(TypeError, match="dwte"):
        llm.fo_embedding_backward(w.astype(np.float64), np.zeros((2, 4), np.int64), dx)
    ref = w.copy()                                           # one token, as numpy.add.at takes it
    np.add.at(ref, 2, dx[0, 0])                              # (dx was asked to be (1, C))
    np.testing.assert_array_equal(llm.fo_embedding_backward(w, np.int64(2), dx[0, 0]), ref)



# A kernel that updates an array in place is never handed a read-only one:
# a memmap opened "r" crashed the interpreter; bytes, or writeable=False,
# were changed silently.
READ_ONLY_CHECK = """
import tempfile, numpy as np, llm
path = tempfile.mktemp()
np.zeros((5, 3), np.float32).tofile(path)
ro, z = np.memmap(path, np.float32, "r", shape=(5, 3)), lambda: {"w": np.zeros((5, 3), np.float32)}
adamw = lambda p, m: llm.fo_adamw_step(p, z(), m, z(), {"w": True}, 1e-3, (0.9, 0.95), 1e-8, 0.1, 1)
emb = lambda d: llm.fo_embedding_backward(d, np.zeros((1, 2), np.int64), np.ones((1, 2, 3), np.float32))
for name, call in [("dwte", lambda: emb(ro)), ("params", lambda: adamw({"w": ro}, z())),
                   ("m", lambda: adamw(z(), {"w": ro}))]:
    try:
        call()
        raise SystemExit(name + ": no error")
    except ValueError as e:
        assert str(e).startswith(name) and "read-only" in str(e), e
print("ok")
"""


def test_read_only_arrays_are_never_written_in_place():
    assert child_output(READ_ONLY_CHECK).split() == ["ok"]
    locked = np.ones((3, 4), np.float32)
    locked.flags.writeable = False
    for p in (np.frombuffer(np.ones(12, np.float32).tobytes(), np.float32).reshape(3, 4), locked):
        with pytest.raises(ValueError, match=r"params\['w'\]: .*read-only"):
            llm.AdamW().step({"w": p}, {"w": np.ones((3, 4), np.float32)})
        assert (p == 1).all()
    model = llm.GPT(llm.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11))
    kv = llm.KVCache()
    llm.next_logits(model, [[1, 2]], kv)
    kv.reserve(0, 4)                                    # room for the next token: no new arrays
    for a in kv.k + kv.v:
        a.flags.writeable = False
    with pytest.raises(ValueError, match="kv: .*read-only"):
        llm.fo_decode_token(model, kv, [3])
    assert kv.n == [2]


def test_in_place_kernels_read_their_inputs_as_they_came():
    """An input that shares memory with an array a kernel updates in place is
    read as it came (copied first, as NumPy's ufuncs do); m and v in one
    memory are an error (their updates would race)."""
    d = np.arange(12, dtype=np.float32).reshape(6, 2)
    idx, ref = np.arange(6)[::-1][None], d.copy()
    np.add.at(ref, idx, d[None].copy())
    np.testing.assert_array_equal(llm.fo_embedding_backward(d, idx, d[None]), ref)
    rng = np.random.default_rng(0)
    adamw = lambda p, g, m, v: llm.fo_adamw_step(p, g, m, v, dict.fromkeys(g, True), 1e-2, (0.9, 0.95), 1e-8, 0.1, 1)
    zeros, ones = lambda *keys: {k: np.zeros(5, np.float32) for k in keys}, lambda: {"w": np.ones(5, np.float32)}
    buf = randn(rng, 6)
    want = buf.copy()
    adamw({"w": buf[1:]}, {"w": buf[:-1]}, ones(), ones())                # the gradient overlaps its parameter
    adamw({"w": want[1:]}, {"w": want[:-1].copy()}, ones(), ones())
    np.testing.assert_array_equal(buf, want)
    mv = zeros("w")
    with pytest.raises(ValueError, match=r"m\['w'\].*v\['w'\]|v\['w'\].*m\['w'\]"):
        adamw(zeros("w"), zeros("w"), mv, mv)                               # m is v
    with pytest.raises(ValueError, match=r"params\['w'\]"):
        adamw(mv, zeros("w"), zeros("w"), mv)                               # v is the parameter


@pytest.mark.parametrize("path", ISAS)
def test_fma_peak_counts_the_flops_it_does(path):
    # bench.py's %peak divides by this count: 12 chains x the ISA's lanes x 2
    # flops, on every thread (AMX's probe is AVX-512's)
    # (every thread asked for, unless OpenMP may give fewer: a team's worth then)
    import os
    lanes = 16 if path in ("amx", "avx512") else 8
    with isa(path):
        threads, left = divmod(lib.fo_fma_peak(1000), 2 * 12 * lanes * 1000)
    assert left == 0 and 1 <= threads <= lib.fo_max_threads()
    if "OMP_THREAD_LIMIT" not in os.environ and os.environ.get("OMP_DYNAMIC", "").lower() != "true":
        assert threads == lib.fo_max_threads()


# ---- the 'auto' backend: each kernel where it beats NumPy here ---------------------

def test_auto_uses_a_kernel_only_where_the_calibration_says_it_wins(monkeypatch):
    choice = llm.kernel_choice()
    assert set(choice) == set(llm.kernels_in_use()) | {"step"} and all(
        c["fastops"] > 0 and c["numpy"] > 0 and c["use"] == (c["fastops"] < c["numpy"]) for c in choice.values())
    prev = llm.set_backend("auto")
    try:
        monkeypatch.setattr(llm, "_CHOICE", {**choice, "linear": {**choice["linear"], "use": False},
                                             "linear_small": {**choice["linear_small"], "use": True},
                                             "linear_one": {**choice["linear_one"], "use": False},
                                             "step": {**choice["step"], "use": True}})
        rng = np.random.default_rng(0)
        big, small, one, w = randn(rng, 64, 8), randn(rng, 2, 8), randn(rng, 1, 8), randn(rng, 8, 4)
        assert not isinstance(llm.ops.linear_forward(big, w, None)[1], llm._Kernel)   # NumPy won: NumPy
        assert isinstance(llm.ops.linear_forward(small, w, None)[1], llm._Kernel)
        assert isinstance(llm.ops.linear_forward(randn(rng, 16, 8), w, None)[1], llm._Kernel)
        assert not isinstance(llm.ops.linear_forward(one, w, None)[1], llm._Kernel)
        assert [llm.kernels_in_use()[f] for f in ("linear", "linear_small", "linear_one")] == [
            "numpy", "fastops", "numpy"]
        # the step all in NumPy beat the chosen mix: no kernel at all
        monkeypatch.setattr(llm, "_CHOICE", {**choice, "step": {**choice["step"], "use": False}})
        assert not isinstance(llm.ops.linear_forward(small, w, None)[1], llm._Kernel)
        assert set(llm.kernels_in_use().values()) == {"numpy"}
    finally:
        llm.set_backend(prev)


def test_calibrate_times_every_family_and_leaves_the_backend_as_it_was():
    prev, before = llm.set_backend("auto"), llm._CHOICE
    try:
        result = llm.calibrate()
        assert set(result) == set(llm.kernels_in_use()) | {"step"}
        assert all(0 < v["fastops"] < math.inf and 0 < v["numpy"] < math.inf
                   and v["use"] == (v["fastops"] < v["numpy"])
                   for v in result.values())
        assert llm._chosen == "auto" and llm._CHOICE is before
    finally:
        llm.set_backend(prev)


def test_the_calibration_is_kept_beside_the_library_and_measured_again_when_asked(monkeypatch, tmp_path):
    import os
    path = llm.calibration_path()
    assert os.path.basename(path).startswith(os.path.basename(llm._fastops.__file__).split(".")[0])
    llm.kernel_choice()
    assert os.path.exists(path)
    calls = []
    monkeypatch.setattr(llm, "calibrate", lambda: calls.append(1) or {"linear": {"use": True}})
    monkeypatch.setattr(llm, "_CHOICE", None)
    llm.kernel_choice()
    assert not calls                                     # read back from the file
    monkeypatch.setattr(llm, "_CHOICE", None)
    monkeypatch.setenv("LLM_CALIBRATE", "1")
    monkeypatch.setattr(llm, "atomic_write", lambda *a: None)
    assert llm.kernel_choice() == {"linear": {"use": True}} and calls == [1]
    monkeypatch.delenv("LLM_CALIBRATE")
    monkeypatch.setattr(llm, "CALIBRATION", llm.CALIBRATION + 1)   # another calibration: not its verdicts
    monkeypatch.setattr(llm, "_CHOICE", None)
    assert llm.calibration_path() != path and llm.kernel_choice() == {"linear": {"use": True}} and calls == [1, 1]
    # a file from before a family was split off
    old = tmp_path / "old.calibration.json"
    old.write_text(json.dumps({f: {"use": True} for f in llm.FAMILIES if f != "linear_one"}))
    monkeypatch.setattr(llm, "calibration_path", lambda: str(old))
    monkeypatch.setattr(llm, "_CHOICE", None)
    llm.kernel_choice()
    assert calls == [1, 1, 1]


def test_openmp_threads_sleep_at_once_only_when_the_cores_are_busy(monkeypatch, tmp_path):
    import os
    (tmp_path / "self" / "task" / "7").mkdir(parents=True)
    (tmp_path / "self" / "task" / "8").mkdir()
    (tmp_path / "loadavg").write_text("0.02 0.16 0.70 4/250 12345\n")
    (tmp_path / "self" / "task" / "7" / "stat").write_text("7 (python (x)) R 1 7 7 0\n")
    (tmp_path / "self" / "task" / "8" / "stat").write_text("8 (python) S 1 7 7 0\n")
    assert llm._others_running(str(tmp_path)) == 3                   # runnable tasks, this process's aside
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.5, 0.5))
    assert llm._others_running(str(tmp_path / "none")) == 0.4        # no /proc: the load average
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    lib = str(tmp_path / "_fastops_abc.cpython-311-x86_64-linux-gnu.so")   # not calibrated yet
    for others, env in ((0, {}), (0.4, {}), (1, {"OMP_WAIT_POLICY": "passive"}), (3, {"OMP_WAIT_POLICY": "passive"})):
        monkeypatch.setattr(llm, "_others_running", lambda: others)
        assert llm._omp_env(lib) == env
    monkeypatch.setattr(llm, "_others_running", lambda: 0)
    for products, env in ((True, {}), (False, {"OMP_WAIT_POLICY": "passive"})):   # NumPy's: OpenBLAS spins
        (tmp_path / os.path.basename(llm.calibration_path(lib))).write_text(json.dumps({"linear": {"use": products}}))
        assert llm._omp_env(lib) == env
    def no_way():
        raise AttributeError("os.getloadavg")                         # Windows
    monkeypatch.setattr(llm, "_others_running", no_way)
    assert llm._omp_env(lib) == {"OMP_WAIT_POLICY": "passive"}


@pytest.mark.skipif(not llm._glibc_defaults(), reason="glibc's malloc settings (Linux, no MALLOC_* in the environment)")
def test_a_step_s_freed_activations_come_back_without_page_faults():
    # A step holds its activations, then frees them all: by glibc's default
    # the heap's top goes back to the system, and each fresh page faults.
    churn = ("import numpy, resource\n"
             "def step():\n"
             "    acts = [numpy.ones((1024, 768), numpy.float32) for _ in range(24)]   # 3 MB each\n"
             "    del acts\n"
             "step()\n"
             "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "for _ in range(5): step()\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n")
    run = lambda pre: int(child_output(pre + churn))
    assert run("") > 5 * 24 * 700               # the default: every page of every array, every step
    assert run("import llm\n") < 100            # llm keeps the freed memory
