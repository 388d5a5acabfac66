"""Section 2's layers one at a time, in float64: every backward (linear,
LayerNorm, GELU, attention with and without dropout, cross-entropy with a
mask, dropout) against central finite differences, on shapes hypothesis
picks; and what each layer must be: LayerNorm gives mean 0 and
variance 1, attention is causal, a fully masked cross-entropy is 0 (not
NaN) with a zero gradient, a uniform one is log V, dropout keeps and scales
what it does not zero."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llm
from helpers import GRAD_TOL, numerical_grad, rel_error

dims = st.integers(1, 7)


def check(forward, backward, inputs, seed=0):
    """forward(*inputs) -> out; backward(dout) -> grads in inputs' order.
    Loss = sum(out * R) for a fixed random R, so dL/dout = R."""
    out = forward(*inputs)
    R = np.random.default_rng(seed).normal(size=np.shape(out))
    grads = backward(R)
    for x, g in zip(inputs, grads):
        num = numerical_grad(lambda: float((forward(*inputs) * R).sum()), x)
        assert rel_error(g, num) < GRAD_TOL


@settings(max_examples=20, deadline=None)
@given(dims, dims, dims, st.booleans(), st.integers(0, 99))
def test_linear(M, K, N, bias, seed):
    r = np.random.default_rng(seed)
    x, w, b = r.normal(size=(M, K)), r.normal(size=(K, N)), r.normal(size=N)
    if bias:
        check(lambda x, w, b: llm.linear_forward(x, w, b)[0],
              lambda d: llm.linear_backward(d, (x, w)), [x, w, b], seed)
    else:
        check(lambda x, w: llm.linear_forward(x, w, None)[0],
              lambda d: llm.linear_backward(d, (x, w))[:2], [x, w], seed)


@settings(max_examples=20, deadline=None)
@given(dims, st.integers(3, 9), st.integers(0, 99))   # C=2: xhat is +-1 whatever x is, dx ~ 0
def test_layernorm(M, C, seed):
    r = np.random.default_rng(seed)
    x, w, b = r.normal(size=(2, M, C)), r.normal(size=C), r.normal(size=C)
    check(lambda x, w, b: llm.layernorm_forward(x, w, b)[0],
          lambda d: llm.layernorm_backward(d, llm.layernorm_forward(x, w, b)[1]), [x, w, b], seed)


def test_layernorm_matches_definition():
    x = np.random.default_rng(0).normal(size=(3, 10))
    y, _ = llm.layernorm_forward(x, np.ones(10), np.zeros(10))
    assert np.allclose(y.mean(-1), 0) and np.allclose(y.var(-1), 1, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(dims, dims, st.integers(0, 99))
def test_gelu(M, N, seed):
    # within +-4: further out the slope is so small that differences measure rounding
    x = np.clip(np.random.default_rng(seed).normal(scale=3, size=(M, N)), -4, 4)
    check(lambda x: llm.gelu_forward(x)[0],
          lambda d: [llm.gelu_backward(d, llm.gelu_forward(x)[1])], [x], seed)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 5),
       st.sampled_from([0.0, 0.3]), st.integers(0, 99))
def test_attention(B, H, T, D, p, seed):
    r = np.random.default_rng(seed)
    q, k, v = (r.normal(size=(B, H, T, D)) for _ in range(3))

    def fwd(q, k, v):     # the same dropout mask on every call
        return llm.attention_forward(q, k, v, p, np.random.default_rng(seed))

    check(lambda q, k, v: fwd(q, k, v)[0],
          lambda d: llm.attention_backward(d, fwd(q, k, v)[1]), [q, k, v], seed)


def test_attention_is_causal():
    r = np.random.default_rng(0)
    q, k, v = (r.normal(size=(1, 2, 6, 4)) for _ in range(3))
    y, _ = llm.attention_forward(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[..., 4:, :] += 10
    v2[..., 4:, :] -= 10
    y2, _ = llm.attention_forward(q, k2, v2)
    assert np.allclose(y[..., :4, :], y2[..., :4, :]) and not np.allclose(y, y2)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(2, 7), st.integers(0, 99))
def test_cross_entropy_with_mask(B, T, V, seed):
    """The mean over the counted positions of -log p(target), and its gradient."""
    r = np.random.default_rng(seed)
    logits, targets = r.normal(size=(B, T, V)), r.integers(0, V, (B, T))
    mask = r.integers(0, 2, (B, T))
    mask[0, 0] = 1
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    nll = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
    assert np.isclose(llm.cross_entropy_forward(logits, targets, mask)[0], (nll * mask).sum() / mask.sum())
    num = numerical_grad(lambda: float(llm.cross_entropy_forward(logits, targets, mask)[0]), logits)
    g = llm.cross_entropy_backward(llm.cross_entropy_forward(logits, targets, mask)[1])
    assert rel_error(g, num) < GRAD_TOL


@pytest.mark.parametrize("dtype", [np.float64, np.float32])     # float32: through llm.ops, fastops where built
def test_cross_entropy_all_masked_is_zero_not_nan(dtype):
    logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(dtype)
    for forward, backward in ((llm.cross_entropy_forward, llm.cross_entropy_backward),
                              (llm.ops.cross_entropy_forward, llm.ops.cross_entropy_backward)):
        loss, cache = forward(logits, np.zeros((2, 3), int), np.zeros((2, 3)))
        assert loss == 0 and not np.isnan(loss)
        assert not backward(cache).any()


def test_cross_entropy_of_uniform_is_log_v():
    loss, _ = llm.cross_entropy_forward(np.zeros((1, 4, 7)), np.arange(4)[None])
    assert np.isclose(loss, np.log(7))


@pytest.mark.parametrize("backend", ["numpy", "fastops"])
def test_cross_entropy_checks_shapes_and_takes_lists(backend):
    """The layer table's cross-entropy, on either backend: targets and mask
    of the logits' shape less the last axis (fastops flattened any shape of
    as many; NumPy broadcast), given as arrays or lists."""
    if backend == "fastops" and llm._fastops is None:
        pytest.skip("fastops is not built")
    previous = llm.set_backend(backend)
    try:
        logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
        targets = np.arange(6).reshape(2, 3) % 5
        for t, mask, name in [(targets.reshape(3, 2), None, "targets"), (targets[:, :1], None, "targets"),
                              (targets, np.ones((3, 2)), "mask"), (targets, np.ones(3), "mask")]:
            with pytest.raises(ValueError, match=name):
                llm.ops.cross_entropy_forward(logits, t, mask)
        mask = [[1, 0, 1], [1, 1, 0]]
        want = llm.ops.cross_entropy_forward(logits, targets, np.array(mask))[0]
        assert llm.ops.cross_entropy_forward(logits, targets.tolist(), mask)[0] == want
    finally:
        llm.set_backend(previous)


@settings(max_examples=10, deadline=None)
@given(st.floats(0.0, 0.9), st.integers(0, 99))
def test_dropout(p, seed):
    x = np.random.default_rng(seed).normal(size=(50, 40))
    y, mask = llm.dropout_forward(x, p, np.random.default_rng(seed))
    if p == 0:
        assert mask is None and y is x
        return
    kept = mask != 0
    assert np.allclose(y[kept], x[kept] / (1 - p)) and not y[~kept].any()
    check(lambda x: llm.dropout_forward(x, p, np.random.default_rng(seed))[0],
          lambda d: [llm.dropout_backward(d, mask)], [x], seed)
