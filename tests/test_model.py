"""The whole model (llm.py sections 2 to 4): GPT-2's parameters and
initialisation; the gradient of every parameter against central finite
differences in float64 (with and without dropout); the loss at
initialisation is about log V, a fully masked batch gives no NaN and no
update, future tokens never change earlier logits, bad ids and
configurations are clear errors; AdamW, gradient clipping, the
learning-rate schedule and gradient accumulation; and sampling: the KV
cache against the full forward, greedy, seeded, top-k and top-p sampling,
stop tokens, streaming, cropping of long prompts, argument checks and
batched generation."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llm
from helpers import GRAD_TOL, numerical_grad, rel_error, tiny


def test_parameter_names_and_shapes_are_gpt2s():
    m = llm.GPT(llm.GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=11))
    names = set(m.params)
    for n in ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "h.1.ln_1.weight",
              "h.1.attn.c_attn.weight", "h.1.attn.c_attn.bias", "h.1.attn.c_proj.weight",
              "h.1.ln_2.bias", "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.bias"]:
        assert n in names
    assert m.params["h.0.attn.c_attn.weight"].shape == (8, 24)      # (in, out)
    assert m.params["h.0.mlp.c_fc.weight"].shape == (8, 32)         # 4x wide
    assert len(names) == 4 + 12 * 2 and "lm_head.weight" not in names  # head tied to wte
    assert all(v.dtype == np.float32 for v in m.params.values())


def test_gpt2_initialisation():
    cfg = llm.GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=500)
    p = llm.GPT(cfg).params
    assert abs(p["wte.weight"].std() - 0.02) < 0.001
    assert abs(p["h.0.attn.c_proj.weight"].std() - 0.02 / np.sqrt(8)) < 0.001
    assert not p["h.0.attn.c_attn.bias"].any() and (p["h.0.ln_1.weight"] == 1).all()


@pytest.mark.parametrize("dropout,T", [(0.0, 6), (0.2, 6), (0.0, 4)])      # (T = 4: wpe's first rows only)
def test_whole_model_gradient(dropout, T):
    m = tiny(dropout=dropout)
    r = np.random.default_rng(0)
    idx, tgt = r.integers(0, 11, (2, T)), r.integers(0, 11, (2, T))
    mask = r.integers(0, 2, (2, T))

    def loss():
        m.rng = np.random.default_rng(5) if dropout else None     # same masks every call
        return m.forward(idx, tgt, mask)[1]

    loss()
    grads = m.backward()
    assert set(grads) == set(m.params)
    for name, p in m.params.items():
        num = numerical_grad(loss, p, max_coords=40)
        assert rel_error(grads[name], num) < GRAD_TOL, name


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_padding_is_never_computed_and_changes_nothing(lengths, seed):
    """Rows padded to T with lengths: the real positions' logits and every
    gradient are those of the same batch computed whole with the padding
    masked out (float64); padding's logits are 0, its ids change nothing."""
    m, r = tiny(), np.random.default_rng(seed)
    B, T, lengths = len(lengths), 6, np.array(lengths)
    idx, tgt = r.integers(0, 11, (B, T)), r.integers(0, 11, (B, T))
    real = np.arange(T) < lengths[:, None]
    mask = real * r.integers(0, 2, (B, T))
    whole, loss = m.forward(idx, tgt, mask)
    grads = m.backward()
    idx[~real] = r.integers(0, 11, (~real).sum())             # other ids where there is padding
    packed, loss2 = m.forward(idx, tgt, mask, lengths)
    grads2 = m.backward()
    np.testing.assert_allclose(packed[real], whole[real], rtol=1e-12, atol=1e-12)
    assert not packed[~real].any() and abs(loss2 - loss) < 1e-12
    for k in grads:
        np.testing.assert_allclose(grads2[k], grads[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_padding_in_float32_through_the_kernels():
    """The same on the default path (fastops when built): float32 tolerance."""
    m, r = tiny("float32", jitter=0, n_embd=64, n_head=4, block_size=40, vocab_size=50), np.random.default_rng(0)
    lengths = np.array([40, 1, 17, 33, 8])
    idx, tgt = r.integers(0, 50, (5, 40)), r.integers(0, 50, (5, 40))
    real = np.arange(40) < lengths[:, None]
    whole, _ = m.forward(idx, tgt, real)
    grads = m.backward()
    packed, _ = m.forward(idx, tgt, real, lengths)
    grads2 = m.backward()
    np.testing.assert_allclose(packed[real], whole[real], rtol=1e-4, atol=1e-5)
    for k in grads:
        np.testing.assert_allclose(grads2[k], grads[k], rtol=1e-3, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_ragged_batch_gradient(dropout):
    m = tiny(dropout=dropout)
    r = np.random.default_rng(3)
    idx, tgt, lengths = r.integers(0, 11, (3, 6)), r.integers(0, 11, (3, 6)), np.array([2, 6, 4])
    mask = (np.arange(6) < lengths[:, None]) * r.integers(0, 2, (3, 6))

    def loss():
        m.rng = np.random.default_rng(5) if dropout else None
        return m.forward(idx, tgt, mask, lengths)[1]

    loss()
    grads = m.backward()
    for name, p in m.params.items():
        assert rel_error(grads[name], numerical_grad(loss, p, max_coords=40)) < GRAD_TOL, name


@pytest.mark.parametrize("lengths,err", [
    ([3, 2], "lengths: expected 3 integers"), ([[1, 2, 3]], "lengths: expected 3 integers"),
    ([1.0, 2.0, 3.0], "lengths: expected 3 integers"), ([0, 2, 3], "lengths: expected lengths in 1..6"),
    ([1, 7, 3], "lengths: expected lengths in 1..6, got 1..7")])
def test_bad_lengths_are_clear_errors(lengths, err):
    with pytest.raises(ValueError, match=err.replace(".", r"\.")):
        tiny().forward(np.zeros((3, 6), int), lengths=np.array(lengths))


def test_loss_at_init_is_about_log_vocab():
    m = llm.GPT(llm.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=100))
    r = np.random.default_rng(0)
    _, loss = m.forward(r.integers(0, 100, (4, 8)), r.integers(0, 100, (4, 8)))
    assert abs(loss - np.log(100)) < 0.1


def test_fully_masked_batch_gives_no_nan_and_no_update():
    m = tiny()
    idx = np.zeros((1, 6), int)
    _, loss = m.forward(idx, idx, np.zeros((1, 6)))
    g = m.backward()
    assert loss == 0 and all(not np.isnan(v).any() and not v.any() for v in g.values())
    before = {k: v.copy() for k, v in m.params.items()}
    llm.AdamW(weight_decay=0.0).step(m.params, g)
    assert all(np.array_equal(before[k], m.params[k]) for k in before)


def test_future_tokens_never_change_earlier_logits():
    m = tiny()
    a = np.array([[1, 2, 3, 4, 5, 6]])
    b = a.copy()
    b[0, 4:] = [9, 10]
    la, lb = m.forward(a)[0], m.forward(b)[0]
    assert np.allclose(la[0, :4], lb[0, :4]) and not np.allclose(la, lb)


@pytest.mark.parametrize("bad,err", [
    (np.array([[0, 11]]), ValueError), (np.array([[-1, 0]]), ValueError),
    (np.zeros((1, 7), int), ValueError), (np.zeros((1, 3)), TypeError),
    (np.zeros((1, 2, 3), int), ValueError)])
def test_bad_ids_are_clear_errors(bad, err):
    with pytest.raises(err, match="idx"):
        tiny().forward(bad)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="n_embd"):
        llm.GPTConfig(n_head=3, n_embd=128)
    with pytest.raises(ValueError, match="dtype"):
        llm.GPTConfig(dtype="float16")


def test_backward_names_a_gradient_of_the_wrong_shape():
    """(It said "cannot reshape".)"""
    m = tiny()
    m.forward(np.array([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"dlogits: expected shape \(1, 3, 11\)"):
        m.backward(dlogits=np.ones((1, 3, 5)))
    with pytest.raises(ValueError, match=r"dh: expected shape \(1, 3, 8\)"):
        m.backward(dh=np.ones((3, 8)))
    with pytest.raises(RuntimeError, match="forward"):
        tiny().backward(dh=np.ones((1, 3, 8)))                        # no forward yet


# ---- optimizer -----------------------------------------------------------

def test_adamw_one_step_matches_the_formula():
    p = {"w": np.array([[1.0, -2.0]]), "b": np.array([0.5])}
    g = {"w": np.array([[0.1, 0.2]]), "b": np.array([-0.3])}
    opt = llm.AdamW(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    opt.step(p, g)
    # first step: m_hat = g, v_hat = g^2, so the step is lr * sign(g)
    assert np.allclose(p["w"], np.array([[1.0, -2.0]]) * (1 - 0.05) - 0.1 * np.sign([[0.1, 0.2]]))
    assert np.allclose(p["b"], 0.5 + 0.1)                # biases are not decayed


@pytest.mark.parametrize("backend", ["numpy", "fastops"])
def test_adamw_three_steps_match_the_formula(backend):
    """m and v each with its own beta (at step 1 a swapped beta changes nothing: m starts at 0)."""
    if backend == "fastops" and llm._fastops is None:
        pytest.skip("fastops not built")
    r = np.random.default_rng(0)
    dtype = np.float64 if backend == "numpy" else np.float32
    p = {"w": r.standard_normal((3, 4)).astype(dtype), "b": r.standard_normal(4).astype(dtype)}
    grads = [{k: r.standard_normal(v.shape).astype(dtype) for k, v in p.items()} for _ in range(3)]
    want = {k: v.astype(np.float64) for k, v in p.items()}
    m, v = {k: 0.0 for k in p}, {k: 0.0 for k in p}
    lr, (b1, b2), eps, wd = 0.01, (0.8, 0.95), 1e-8, 0.1
    previous = llm.set_backend(backend)
    try:
        opt = llm.AdamW(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
        for t, g in enumerate(grads, 1):
            opt.step(p, g)
            for k in p:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k].astype(np.float64) ** 2
                decayed = want[k] * (1 - lr * wd) if k == "w" else want[k]     # matrices only
                want[k] = decayed - lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
    finally:
        llm.set_backend(previous)
    for k in p:
        np.testing.assert_allclose(p[k], want[k], rtol=1e-5 if backend == "fastops" else 1e-12, atol=1e-6 if backend == "fastops" else 0)


def test_clip_scale():
    g = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    norm, scale = llm.clip_scale(g, 1.0)
    assert norm == 5.0 and np.isclose(np.sqrt((g["a"] * scale) ** 2 + (g["b"] * scale) ** 2), 1.0, atol=1e-5).all()
    assert llm.clip_scale(g, 10.0) == (5.0, 1.0) and llm.clip_scale(g, 0.0) == (5.0, 1.0)   # 0: never


@pytest.mark.parametrize("backend", ["numpy", "fastops"])
def test_adamw_step_with_max_norm_is_clipping_then_the_step(backend):
    """step(max_norm=) scales the gradients as it reads them: the same
    parameters and moments, bit for bit, as scaling them first (in place, as
    PyTorch's clip_grad_norm_), and they themselves are left as they came."""
    if backend == "fastops" and llm._fastops is None:
        pytest.skip("fastops is not built")
    previous = llm.set_backend(backend)
    try:
        rng = np.random.default_rng(0)
        shapes = {"w": (5, 7), "b": (7,), "s": ()}
        params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        grads = {k: (3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
        p1, p2 = {k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in params.items()}
        o1, o2 = llm.AdamW(lr=0.1), llm.AdamW(lr=0.1)
        for max_norm in (0.5, 100.0, 1.0):                   # clipped, not clipped, clipped
            g1 = {k: v.copy() for k, v in grads.items()}
            n1, scale = llm.clip_scale(g1, max_norm)
            for k in g1:
                g1[k] *= scale
            o1.step(p1, g1)
            g2 = {k: v.copy() for k, v in grads.items()}
            assert o2.step(p2, g2, max_norm=max_norm) == n1
            assert all(np.array_equal(g2[k], grads[k]) for k in grads)
            for k in params:
                for a, b in ((p1, p2), (o1.m, o2.m), (o1.v, o2.v)):
                    assert a[k].dtype == b[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k
        assert o2.step(p2, grads) is None                       # no max_norm: no clipping, no norm
    finally:
        llm.set_backend(previous)


@pytest.mark.parametrize("backend", ["numpy", "fastops"])
def test_adamw_bad_betas_or_step_are_clear_errors(backend):
    """beta = 1 or a step t < 1 divide by 1 - beta^t = 0 (NaN weights in C,
    ZeroDivisionError in NumPy)."""
    if backend == "fastops" and llm._fastops is None:
        pytest.skip("fastops is not built")
    for betas in [(1.0, 0.95), (0.9, 1.0), (-0.1, 0.95), (0.9, float("nan"))]:
        with pytest.raises(ValueError, match="betas"):
            llm.AdamW(betas=betas)
    previous = llm.set_backend(backend)
    try:
        p, g = {"w": np.ones((2, 3), np.float32)}, {"w": np.ones((2, 3), np.float32)}
        with pytest.raises(ValueError, match="^t: "):
            llm.AdamW(t=-1).step(p, g)                          # this step would be t = 0
        opt = llm.AdamW()
        opt.betas = (1.0, 0.95)
        with pytest.raises(ValueError, match="betas"):
            opt.step(p, g)
        assert (p["w"] == 1).all()
    finally:
        llm.set_backend(previous)


def test_lr_schedule():
    s = [llm.lr_schedule(i, 1e-3, 1e-4, 10, 100) for i in range(120)]
    assert s[0] == 1e-4 and np.isclose(s[9], 1e-3) and max(s) <= 1e-3
    assert np.isclose(s[99], 1e-4, rtol=1e-2) and s[110] == 1e-4
    assert all(a >= b for a, b in zip(s[10:100], s[11:100]))
    # the cosine runs from the warmup's end: the peak there, halfway down at the middle
    assert llm.lr_schedule(10, 1e-3, 1e-4, 10, 110) == pytest.approx(1e-3)
    assert llm.lr_schedule(60, 1e-3, 1e-4, 10, 110) == pytest.approx(5.5e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 60), block=st.integers(1, 8), batch=st.integers(1, 5), seed=st.integers(0, 99))
def test_a_batch_is_windows_of_the_text_and_the_targets_are_the_next_tokens(n, block, batch, seed):
    data = np.random.default_rng(seed).integers(0, 1000, n + block)
    x, y = llm.get_batch(data, block, batch, np.random.default_rng(seed))
    assert x.shape == y.shape == (batch, block) and x.flags.c_contiguous and y.flags.c_contiguous
    for row_x, row_y in zip(x, y):
        starts = [i for i in range(len(data) - block) if (data[i:i + block] == row_x).all()]
        assert any((data[i + 1:i + 1 + block] == row_y).all() for i in starts)


def test_train_steps_accumulates_the_mean_of_its_micro_batches(monkeypatch):
    """grad_accum = 2: the step takes the gradient of both micro-batches
    together (their mean), as one batch of both would give."""
    m = tiny()
    r = np.random.default_rng(0)
    idx, tgt = r.integers(0, 11, (4, 6)), r.integers(0, 11, (4, 6))
    m.forward(idx, tgt)
    big = m.backward()
    halves, stepped = iter([(idx[:2], tgt[:2]), (idx[2:], tgt[2:])]), []
    monkeypatch.setattr(llm.AdamW, "step", lambda self, params, grads, lr=None, max_norm=None: stepped.append(grads))
    tc = llm.TrainConfig(batch_size=2, max_iters=1, grad_accum=2, eval_interval=10)
    llm.train_steps(m, llm.TrainState(), tc, lambda rng: next(halves))
    assert set(stepped[0]) == set(big)
    for k in big:
        assert np.allclose(stepped[0][k], big[k]), k


def test_evaluation_runs_without_dropout_and_gives_back_the_generator():
    m, data = tiny(dropout=0.5), np.random.default_rng(0).integers(0, 11, 200)
    m.rng = gen = np.random.default_rng(0)                          # training with dropout
    with_rng = llm.estimate_loss(m, data, 2, 3)
    assert m.rng is gen
    m.rng = None
    assert with_rng == llm.estimate_loss(m, data, 2, 3)


def test_gradient_accumulation_equals_the_big_batch():
    m = tiny()
    r = np.random.default_rng(0)
    idx, tgt = r.integers(0, 11, (4, 6)), r.integers(0, 11, (4, 6))
    m.forward(idx, tgt)
    big = m.backward()
    m.forward(idx[:2], tgt[:2])
    g1 = m.backward()
    m.forward(idx[2:], tgt[2:])
    g2 = m.backward()
    for k in big:
        assert np.allclose(big[k], (g1[k] + g2[k]) / 2)


# ---- sampling ------------------------------------------------------------

def test_kv_cache_equals_full_forward_at_every_position():
    m = tiny(dtype="float32")
    ids = np.array([[3, 1, 4, 1, 5, 9]])
    full = m.forward(ids)[0]
    kv = llm.KVCache()
    pre = m.forward(ids[:, :3], kv_cache=kv)[0]
    steps = [m.forward(ids[:, t:t + 1], kv_cache=kv)[0] for t in range(3, 6)]
    cached = np.concatenate([pre] + steps, 1)
    assert np.allclose(cached, full, atol=1e-5)



def test_kv_cache_takes_new_positions_in_chunks_of_any_length():
    m = tiny(dtype="float32")
    ids = np.array([[3, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]])
    kv = llm.KVCache()
    cached = [m.forward(ids[:, a:b], kv_cache=kv)[0] for a, b in ((0, 1), (1, 4), (4, 5), (5, 6))]
    assert np.allclose(np.concatenate(cached, 1), m.forward(ids)[0], atol=1e-5)


def test_a_kv_cache_of_another_model_or_batch_is_a_clear_error():
    """(Another number of layers or rows was used silently: a row broadcast
    into every row of the cache, a layer left behind.)"""
    ids = np.array([[1, 2]])
    kv = llm.KVCache()
    tiny(dtype="float32").forward(ids, kv_cache=kv)                      # 2 layers, 2 heads, 1 row
    for model, x in [(tiny(dtype="float32", n_layer=1), ids), (tiny(dtype="float32", n_layer=3), ids),
                     (tiny(dtype="float32", n_head=4), ids), (tiny(dtype="float32"), np.array([[1], [2]]))]:
        with pytest.raises(ValueError, match="kv_cache"):
            model.forward(x, kv_cache=kv)
    two = llm.KVCache()
    tiny(dtype="float32").forward(np.array([[1, 2], [3, 4]]), kv_cache=two)
    with pytest.raises(ValueError, match="kv_cache"):
        tiny(dtype="float32").forward(np.array([[5]]), kv_cache=two)
    two.n[1] -= 1                                                        # layers at different positions
    with pytest.raises(ValueError, match="kv_cache"):
        tiny(dtype="float32").forward(np.array([[5], [6]]), kv_cache=two)
    k = np.zeros((1, 2, 1, 4), np.float32)
    with pytest.raises(ValueError, match="layer"):
        llm.KVCache().extend(1, k, k)


def test_greedy_is_argmax_and_seeds_repeat():
    m = tiny(dtype="float32")
    out = list(llm.generate(m, [1, 2], max_new_tokens=4, temperature=0))
    ids = [1, 2]
    for t in out:
        assert t == int(np.argmax(m.forward(np.array([ids]))[0][0, -1]))
        ids.append(t)
    a = list(llm.generate(m, [1, 2], 10, temperature=1.0, seed=7))
    b = list(llm.generate(m, [1, 2], 10, temperature=1.0, seed=7))
    assert a == b and len(a) == 10
    assert list(llm.generate(m, [1, 2], 5, top_k=1, seed=3)) == out + [
        next(iter(llm.generate(m, [1, 2] + out, 1, temperature=0)))]


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 3.0), st.integers(1, 11), st.floats(0.01, 1.0), st.integers(0, 99))
def test_sampling_distribution_properties(temp, k, p, seed):
    logits = np.random.default_rng(seed).normal(size=11) * 3
    probs = llm.next_token_probs(logits, temp, k, p)
    assert np.isclose(probs.sum(), 1) and (probs >= 0).all()
    assert np.count_nonzero(probs) <= k
    assert probs[np.argmax(logits)] > 0                       # the likeliest always survives
    kept = np.sort(probs[probs > 0])[::-1]
    full = llm.next_token_probs(logits, temp, k)
    # the nucleus is the smallest prefix (by probability) reaching mass p
    assert full[np.argsort(-full)][:len(kept) - 1].sum() < p + 1e-9


def test_top_k_and_top_p_keep_exactly_their_sets():
    """Ties: top_k=1 kept every token tied with the largest. A nucleus whose
    mass is exactly p: the rounding of the sums kept one token more."""
    assert llm.next_token_probs(np.array([1.0, 1.0, 1.0, 0.0]), top_k=1).tolist() == [1, 0, 0, 0]
    assert llm.next_token_probs(np.array([0.0, 2.0, 2.0, 2.0]), top_k=2).tolist() == [0, 0.5, 0.5, 0]
    for n, p, kept in ((10, 0.8, 8), (100, 0.02, 2), (20, 0.4, 8), (20, 0.45, 9), (20, 0.5, 10), (20, 0.55, 11)):
        assert np.count_nonzero(llm.next_token_probs(np.zeros(n), top_p=p)) == kept, (n, p)


def test_bad_logits_and_sampling_settings_are_named():
    for kw, name in [({"logits": np.zeros((1, 5))}, "logits"), ({"logits": np.array([0.0, np.nan])}, "logits"),
                     ({"temperature": "1"}, "temperature"), ({"top_p": "0.5"}, "top_p")]:
        with pytest.raises(ValueError, match=name):
            llm.next_token_probs(**{"logits": np.zeros(5), **kw})
    m = tiny(dtype="float32")
    for n in (2.5, True, False, 0.0, "3"):
        with pytest.raises(ValueError, match="max_new_tokens"):
            list(llm.generate(m, [1], n))
        with pytest.raises(ValueError, match="max_new_tokens"):
            llm.generate_batch(m, [[1]], n)


def test_temperature_zero_puts_all_the_mass_on_the_likeliest_token():
    logits = np.array([0.5, 3.0, -1.0, 2.9])
    assert llm.next_token_probs(logits, 0.0).tolist() == [0.0, 1.0, 0.0, 0.0]   # was NaN: logits / 0


def test_stop_tokens_max_tokens_and_streaming():
    m = tiny(dtype="float32")
    greedy = list(llm.generate(m, [1], 6, temperature=0))
    stop = greedy[2]
    out = list(llm.generate(m, [1], 6, temperature=0, stop={stop}))
    assert out == greedy[:greedy.index(stop)]
    gen = llm.generate(m, [1], 3, temperature=0)
    assert next(gen) == greedy[0]                              # a stream, token by token
    assert list(llm.generate(m, [1], 0)) == []


def test_prompt_longer_than_the_context_is_cropped():
    m = tiny(dtype="float32")
    long = list(range(1, 11)) * 2                               # 20 tokens, context 6
    out = list(llm.generate(m, long, 8, temperature=0))
    assert out == list(llm.generate(m, long[-6:], 8, temperature=0)) and len(out) == 8


def test_a_full_window_keeps_the_last_block_size_tokens_in_view(monkeypatch):
    """Once the context is full, each new token is predicted from exactly
    the last block_size tokens (the model never saw more, nor fewer)."""
    m, seen = tiny(dtype="float32"), []                        # block_size 6
    real = llm.ops.next_logits
    monkeypatch.setattr(llm.ops, "next_logits", lambda model, ids, kv: seen.append(kv.length + len(ids[0]))
                        or real(model, ids, kv))
    assert len(list(llm.generate(m, [1, 2], 10, temperature=0))) == 10
    assert seen == [2, 3, 4, 5, 6, 6, 6, 6, 6, 6]


def test_bad_sampling_arguments():
    m = tiny(dtype="float32")
    for kw, name in [({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
                     ({"temperature": -1}, "temperature")]:
        with pytest.raises(ValueError, match=name):
            list(llm.generate(m, [1], 2, **kw))
    with pytest.raises(ValueError, match="prompt"):
        list(llm.generate(m, [], 2))
    with pytest.raises(ValueError, match="prompt"):
        list(llm.generate(m, [99], 2))



def test_batched_generation_checks_its_sampling_arguments():
    m = tiny(dtype="float32")
    for kw, name in [({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                     ({"max_new_tokens": -3}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=name):
            llm.generate_batch(m, [[1, 2]], **kw)


def test_a_temperature_near_zero_is_greedy():
    """T -> 0 is greedy, however small T is (logits / T overflowed: token 0,
    or NaN probabilities)."""
    m = tiny(dtype="float32")
    prompts = [[1, 2], [3, 4], [5]]
    greedy = llm.generate_batch(m, prompts, 4)
    for t in (1e-40, 1e-300, 5e-324):
        assert llm.generate_batch(m, prompts, 4, temperature=t) == greedy
        assert list(llm.generate(m, [1, 2], 4, temperature=t)) == greedy[0][0]
        assert llm.next_token_probs(np.array([-3.0, -1.0, -2.0]), t).tolist() == [0, 1, 0]
        with warnings.catch_warnings():             # no overflow said either, where the largest is 0
            warnings.simplefilter("error")
            assert llm.next_token_probs(np.array([0.0, -1.0]), t).tolist() == [1, 0]


def test_prompts_are_integer_token_ids():
    """(generate ran [1.9, 2.7] as [1, 2] and [True] as [1]; generate_batch
    named a bad prompt `idx`.)"""
    m = tiny(dtype="float32")
    for bad in ([1.9, 2.7], [True], np.array([1.0, 2.0]), [[1, 2], [3, 4]], [], [11]):
        with pytest.raises((TypeError, ValueError), match="prompt: "):
            list(llm.generate(m, bad, 2))
        with pytest.raises((TypeError, ValueError), match=r"prompts\[1\]: "):
            llm.generate_batch(m, [[1], bad], 2)
    assert list(llm.generate(m, np.array([1, 2]), 3, temperature=0)) == list(llm.generate(m, (1, 2), 3, temperature=0))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_a_config_s_sizes_are_positive_integers(bad):
    """(True passed as 1.)"""
    with pytest.raises(ValueError, match="n_layer: expected a positive integer"):
        llm.GPTConfig(n_layer=bad)


def test_top_k_is_a_positive_integer():
    """(2.5 was an IndexError, NaN was ignored, "3" a TypeError.)"""
    for k in (2.5, float("nan"), "3", 0, -1, True):
        with pytest.raises(ValueError, match="top_k"):
            llm.next_token_probs(np.zeros(5), 1.0, k)
    assert llm.next_token_probs(np.arange(5.0), 1.0, np.int64(2))[:3].tolist() == [0, 0, 0]


def test_batched_generation_equals_one_at_a_time():
    m = tiny(dtype="float32")
    prompts = [[1, 2], [3, 4], [5], [2, 2, 2], [7, 1]]
    outs, ended = llm.generate_batch(m, prompts, 4, stop={3})
    for p, o, e in zip(prompts, outs, ended):
        one = list(llm.generate(m, p, 4, temperature=0, stop={3}))
        assert o == one[:len(o)] and (e == (len(one) < 4 and len(p) + len(one) < 6))


def test_batched_generation_runs_to_the_window_s_end():
    """Without a stop token a row gets max_new_tokens, or as many as the
    window has room for after its prompt (and one at its very end)."""
    m = tiny(dtype="float32")                                  # block_size 6
    outs, ended = llm.generate_batch(m, [[1, 2, 3, 4, 5, 6], [1, 2], [3]], 8, stop=())
    assert [len(o) for o in outs] == [1, 5, 6] and ended == [False] * 3
    outs, _ = llm.generate_batch(m, [[1, 2]], 3, stop=())
    assert len(outs[0]) == 3


def test_batched_sampling_follows_the_distribution():
    m = tiny(dtype="float32")
    outs, _ = llm.generate_batch(m, [[1, 2]] * 4000, 1, temperature=1.0, rng=np.random.default_rng(0))
    counts = np.bincount([o[0] for o in outs], minlength=11) / 4000
    probs = llm.next_token_probs(m.forward(np.array([[1, 2]]))[0][0, -1])
    assert np.abs(counts - probs).max() < 0.03
