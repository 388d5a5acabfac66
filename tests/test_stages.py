"""The training stages after pretraining (llm.py sections 6 to 8).
Instruction tuning: the chat template trains on the answer and <|end|>
only, long conversations keep their answer. RLHF: the reward, PPO and DPO
losses' gradients against central finite differences in float64 (PPO's with
its pretraining term, PPO-ptx), GAE, the
reward model reading the last token, unended rejections, the KL controller. LoRA: it starts at
the base model and trains only A and B, it is the base model with W +
(alpha/r) A B, its gradients (with and without dropout) against finite
differences, merging, unmerging, saving, and loading onto a base model,
which freezes it."""

import copy
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import llm
from helpers import GRAD_TOL, numerical_grad, rel_error, tiny


def check_grads(model, loss_and_grads, names=None, tol=GRAD_TOL):
    loss, grads = loss_and_grads()
    if names is None:               # every trainable parameter gets its gradient, none is left out
        assert set(grads) == set(model.params) - model.frozen
    for name in names or grads:
        num = numerical_grad(lambda: loss_and_grads()[0], model.params[name], max_coords=25)
        assert rel_error(grads[name], num) < tol, name
        if name.startswith("h."):     # every block's weights move the loss: 0 = 0 would check nothing
            assert np.nanmax(np.abs(num)) > 0, f"{name}: the loss does not depend on it"


def test_reward_loss_gradient():
    """A parameter that adds the same to every score cancels in the margins
    of the pairs: the score head's bias, and the final LayerNorm's bias
    (which adds its product with the head's weight). Their gradients are 0
    up to the rounding of summing the margins' +- gradients (for most
    weights 1 ulp or so, not 0.0) and are checked so, on their own: finite
    differences of a loss that does not depend on them are rounding noise,
    and against noise the relative error is ~1, whatever the backward does.
    Every other parameter: finite differences."""
    m = tiny()
    llm.add_head(m, "score", np.random.default_rng(0))
    r = np.random.default_rng(1)
    x = r.integers(0, 11, (4, 6))
    last = np.array([5, 3, 4, 2])
    f = lambda: llm.reward_loss(m, (x, last))       # noqa: E731
    _, grads = f()
    assert set(grads) == set(m.params) - m.frozen
    scores, _ = llm.reward_scores(m, x, last)
    _, dmargin = llm.bradley_terry(scores[:2] - scores[2:])
    rounding = 4 * np.finfo(np.float64).eps * 2 * np.abs(dmargin).sum()     # of summing +-dmargin
    assert abs(float(grads["score.bias"])) <= rounding
    assert np.abs(grads["ln_f.bias"]).max() <= rounding * np.abs(m.params["score.weight"]).max()
    check_grads(m, f, names=sorted(set(grads) - {"score.bias", "ln_f.bias"}))


def test_dpo_loss_gradient():
    m, ref = tiny(seed=0), tiny(seed=5)
    r = np.random.default_rng(1)
    x, y = r.integers(0, 11, (4, 6)), r.integers(0, 11, (4, 6))
    lengths = np.array([6, 4, 5, 3])                        # rows padded to 6: never computed
    mask = ((np.arange(6) >= 2) & (np.arange(6) < lengths[:, None])).astype(float)
    check_grads(m, lambda: llm.dpo_loss(m, ref, (x, y, mask, lengths), beta=0.5))


def test_ppo_loss_gradient():
    m = tiny()
    llm.add_head(m, "value", np.random.default_rng(0))
    r = np.random.default_rng(2)
    x, y = r.integers(0, 11, (3, 6)), r.integers(0, 11, (3, 6))
    lengths = np.array([6, 4, 5])
    mask = ((np.arange(6) >= 2) & (np.arange(6) < lengths[:, None])).astype(float)
    logp, _, h = llm.sequence_logprobs(m, x, y, lengths)
    v = llm.head_forward(m, "value", h, np.broadcast_to(np.arange(6), x.shape))
    mb = dict(x=x, y=y, mask=mask, lengths=lengths, logp=logp + r.normal(0, 0.3, logp.shape),
              values=v + r.normal(0, 0.3, v.shape), adv=r.normal(size=x.shape), ret=r.normal(size=x.shape))
    pc = llm.PPOConfig()
    check_grads(m, lambda: llm.ppo_loss(m, mb, pc)[:2])
    # n: the answer tokens of every rank's minibatch, which the loss is averaged over
    (l1, g1, _), (l7, g7, _) = llm.ppo_loss(m, mb, pc), llm.ppo_loss(m, mb, pc, n=7.0)
    assert np.isclose(l7, l1 * mask.sum() / 7)
    assert all(np.allclose(g7[k], g1[k] * mask.sum() / 7, rtol=1e-6, atol=1e-12) for k in g1)


@pytest.mark.parametrize("share", [1.0, 0.25])
def test_ppo_ptx_adds_the_pretraining_losss_gradient(share):
    """PPO-ptx: the update's gradients are those of the PPO loss plus
    ptx_coef times the pretraining loss on the replayed windows (times these
    rows' share of all the windows, with several ranks)."""
    m = tiny()
    llm.add_head(m, "value", np.random.default_rng(0))
    r = np.random.default_rng(2)
    x, y = r.integers(0, 11, (3, 6)), r.integers(0, 11, (3, 6))
    lengths, mask = np.array([6, 6, 6]), (np.arange(6) >= 2) * np.ones((3, 1))
    logp, _, h = llm.sequence_logprobs(m, x, y, lengths)
    mb = dict(x=x, y=y, mask=mask, lengths=lengths, logp=logp + r.normal(0, 0.3, logp.shape),
              values=r.normal(size=x.shape), adv=r.normal(size=x.shape), ret=r.normal(size=x.shape))
    wx, wy = llm.get_batch(r.integers(0, 11, 100), 6, 3, r)

    def total():
        loss, grads, _ = llm.ppo_loss(m, mb, llm.PPOConfig())
        return loss + 0.7 * llm.ptx_grads(m, wx, wy, grads, 0.7, share), grads
    check_grads(m, total)
    zero = {k: 0.0 for k in m.params}
    assert np.isclose(llm.ptx_grads(m, wx, wy, zero, 0.7, share), share * m.forward(wx, wy)[1])
    lm = m.backward()                                       # (the value head has none: 0 stays)
    assert all(np.allclose(g, 0.7 * share * lm.get(k, 0.0)) for k, g in zero.items())


def test_gae_with_lambda_one_is_the_return_minus_value():
    rewards = np.array([[0.0, 1.0, 2.0, 0.0]])
    values = np.array([[0.5, 0.1, 0.2, 0.0]])
    mask = np.array([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = llm.gae(rewards, values, mask, 1.0, 1.0)
    assert np.allclose(ret[0, :3], [3.0, 3.0, 2.0]) and np.allclose(adv[0, :3], [2.5, 2.9, 1.8])
    assert adv[0, 3] == 0


def test_gae_follows_its_recursion():
    """gamma and lambda apart (with both 1 a missing lambda changed nothing):
    A_t = delta_t + gamma lambda A_t+1, delta_t = r_t + gamma V_t+1 - V_t."""
    r, v, m = np.array([[1.0, 0.0, 2.0, 0.0]]), np.array([[0.5, 0.2, 0.1, 0.0]]), np.array([[1.0, 1, 1, 0]])
    g, lam = 0.9, 0.5
    adv, ret = llm.gae(r, v, m, g, lam)
    want, a, v_next = np.zeros(4), 0.0, 0.0
    for t in (2, 1, 0):
        a = r[0, t] + g * v_next - v[0, t] + g * lam * a
        want[t], v_next = a, v[0, t]
    np.testing.assert_allclose(adv[0], want)
    np.testing.assert_allclose(ret[0, :3], want[:3] + v[0, :3])


def test_dpo_loss_is_log_2_at_the_reference():
    """Policy = reference: every margin is 0 and the loss -log sigmoid(0)
    (the gradient check alone passes a wrong loss with its own gradient)."""
    m = tiny()
    r = np.random.default_rng(1)
    x, y, lengths = r.integers(0, 11, (4, 6)), r.integers(0, 11, (4, 6)), np.array([6, 4, 5, 3])
    mask = ((np.arange(6) >= 2) & (np.arange(6) < lengths[:, None])).astype(float)
    assert llm.dpo_loss(m, copy.deepcopy(m), (x, y, mask, lengths), 0.5)[0] == pytest.approx(math.log(2), abs=1e-12)


def test_the_reward_model_scores_the_hidden_state_of_each_rows_last_token():
    m = tiny()
    llm.add_head(m, "score", np.random.default_rng(0))
    x, last = np.random.default_rng(1).integers(0, 11, (3, 6)), np.array([5, 2, 0])
    got, _ = llm.reward_scores(m, x, last)
    np.testing.assert_allclose(got, llm.head_forward(m, "score", m.hidden(x), last[:, None])[:, 0], rtol=1e-12)


def test_a_rollout_gives_each_answer_its_score_at_its_end(monkeypatch):
    """Without the KL penalty and with gamma = lambda = 1, every answer
    token's return is the answer's score."""
    tok = llm.byte_tokenizer()
    policy = tiny(vocab_size=tok.vocab_size, block_size=32)
    llm.add_head(policy, "value")
    examples = [llm.chat_example(tok, "q", "abc"), llm.chat_example(tok, "qq", "de")]
    monkeypatch.setattr(llm, "sampled_answers", lambda *a: (["abc", "de"], [True, True], examples))
    monkeypatch.setattr(llm, "score_conversations", lambda *a: np.array([2.0, -1.0]))
    ro = llm.ppo_rollout(policy, policy, None, tok, ["q", "qq"], llm.PPOConfig(kl_coef=0.0, gamma=1.0, lam=1.0),
                         np.random.default_rng(0))
    assert ro["mask"].sum(1).tolist() == [5, 4]                 # " abc", " de" (encode_answer) and their end tokens
    np.testing.assert_allclose(ro["ret"] * ro["mask"], np.array([[2.0], [-1.0]]) * ro["mask"])


@given(kl=st.floats(0, 10), target=st.floats(0.05, 5), coef=st.floats(0.01, 10))
def test_the_kl_controller_moves_the_penalty_toward_the_target_by_at_most_2_percent(kl, target, coef):
    new = llm.adapt_kl_coef(coef, kl, target)
    assert coef * 0.98 - 1e-12 <= new <= coef * 1.02 + 1e-12
    if kl > target * 1.001:
        assert new > coef                                   # strayed too far: a stronger penalty
    elif kl < target * 0.999:
        assert new < coef
    if kl >= 1.2 * target:
        assert new == pytest.approx(coef * 1.02)


# ---- instruction tuning ----------------------------------------------------

def test_chat_template_masks_the_answer_only():
    tok = llm.byte_tokenizer()
    ex = llm.chat_example(tok, "Hi?", "Yo.")
    x, y, mask, lengths = llm.pad_batch([ex, llm.chat_example(tok, "Longer question?", "A.")], 0, 64)
    s = tok.special
    # the answer is encoded after a space (llm.encode_answer), as text after "A:" is
    assert ex[0] == [s[llm.USER], *b"Hi?", s[llm.ASSISTANT], *b" Yo.", s[llm.END]]
    counted = [int(t) for t, m in zip(y[0], mask[0]) if m]
    assert counted == [*b" Yo.", s[llm.END]]                # answer + <|end|>, nothing else
    assert mask[0, len(ex[0]) - 1:].sum() == 0              # padding never counts
    assert list(lengths) == [len(ex[0]) - 1, x.shape[1]]
    assert [int(t) for t, m in zip(y[1], mask[1]) if m] == [*b" A.", s[llm.END]]


def test_long_conversations_keep_their_answer():
    tok = llm.byte_tokenizer()
    ex = llm.chat_example(tok, "x" * 100, "The answer.")
    x, y, mask, lengths = llm.pad_batch([ex], 0, 32)
    counted = [int(t) for t, m in zip(y[0], mask[0]) if m]
    assert x.shape == (1, 32) and list(lengths) == [32] and counted == [*b" The answer.", tok.special[llm.END]]


def test_the_reward_model_reads_the_last_token_end_included():
    tok = llm.byte_tokenizer()
    ended, unended = llm.chat_example(tok, "q", "A.", True), llm.chat_example(tok, "q", "A.", False)
    x, last = llm.reward_batch(tok, [ended, unended], 64)
    assert x[0, last[0]] == tok.special[llm.END] and x[1, last[1]] == ord(".")
    x, last = llm.reward_batch(tok, [llm.chat_example(tok, "x" * 100, "A.")], 32)
    assert x.shape == (1, 32) and x[0, last[0]] == tok.special[llm.END]


def test_unended_rejections_get_no_end_token():
    tok = llm.byte_tokenizer()
    r = {"prompt": "q", "chosen": "Sure! A.", "rejected": "A and", "flaw": "unended"}
    assert llm.preference_example(tok, r, "chosen")[0][-1] == tok.special[llm.END]
    assert llm.preference_example(tok, r, "rejected")[0][-1] != tok.special[llm.END]


# ---- LoRA ------------------------------------------------------------------

def test_lora_starts_at_the_base_model_and_trains_only_a_and_b():
    m = tiny()
    ids = np.array([[1, 2, 3, 4, 5]])
    base = m.forward(ids)[0]
    names = llm.add_lora(m, r=2, alpha=4.0)
    assert np.array_equal(m.forward(ids)[0], base)
    assert names and all(".lora_" in n for n in names)
    m.forward(ids, ids)
    assert set(m.backward()) == set(names)
    assert 0 < llm.trainable_fraction(m) < 1


def randomise_b(model, r):
    """LoRA's B matrices start at zero (the adapters add nothing yet): random
    ones make every adapter count."""
    for k in model.params:
        if k.endswith("lora_B"):
            model.params[k] = r.normal(0, 0.5, model.params[k].shape)


def test_lora_adds_alpha_over_r_times_a_b_to_each_weight():
    """Against a reference with no adapter code in it: the base model whose
    adapted weights are W + (alpha / r) A B."""
    m = tiny()
    ref = copy.deepcopy(m)
    llm.add_lora(m, r=4, alpha=16.0)
    randomise_b(m, np.random.default_rng(3))
    assert m.lora and all(s["scale"] == 16.0 / 4 for s in m.lora.values())
    for name in m.lora:
        ref.params[name + ".weight"] = ref.params[name + ".weight"] + \
            (16.0 / 4) * (m.params[name + ".lora_A"] @ m.params[name + ".lora_B"])
    ids = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 1]])
    want = ref.forward(ids)[0]
    assert not np.allclose(want, tiny().forward(ids)[0], rtol=1e-3)   # the adapters count
    np.testing.assert_allclose(m.forward(ids)[0], want, rtol=1e-10, atol=1e-12)


def test_load_lora_freezes_the_base_model(tmp_path):
    """Adapters loaded onto a fresh base model: only they train."""
    m = tiny()
    llm.add_lora(m, r=2)
    randomise_b(m, np.random.default_rng(3))
    path = str(tmp_path / "a.safetensors")
    llm.save_lora(path, m)
    fresh = tiny()
    assert not fresh.frozen
    llm.load_lora(path, fresh)
    assert fresh.frozen == set(llm.param_shapes(fresh.config))
    x, y = np.random.default_rng(4).integers(0, 11, (2, 6, 2)).transpose(2, 0, 1)
    fresh.forward(x, y)
    grads = fresh.backward()
    assert grads and set(grads) == {k for k in fresh.params if ".lora_" in k}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_gradients(dropout):
    m = tiny()
    llm.add_lora(m, targets=("attn.c_attn", "mlp.c_proj"), r=2, alpha=3.0, dropout=dropout)
    r = np.random.default_rng(3)
    randomise_b(m, r)
    x, y = r.integers(0, 11, (2, 6)), r.integers(0, 11, (2, 6))

    def f():
        m.rng = np.random.default_rng(9) if dropout else None
        _, loss = m.forward(x, y)
        return loss, m.backward()
    check_grads(m, f)


def test_merge_equals_unmerged_and_unmerge_restores(tmp_path):
    m = tiny()
    llm.add_lora(m, r=2)
    r = np.random.default_rng(3)
    randomise_b(m, r)
    ids = np.array([[1, 2, 3, 4]])
    w0 = m.params["h.0.mlp.c_fc.weight"].copy()
    adapted = m.forward(ids)[0]
    path = str(tmp_path / "a.safetensors")
    llm.save_lora(path, m)
    llm.merge_lora(m)
    assert not m.lora and np.allclose(m.forward(ids)[0], adapted)
    llm.unmerge_lora(m)
    assert m.lora and np.allclose(m.params["h.0.mlp.c_fc.weight"], w0)
    fresh = tiny()
    llm.load_lora(path, fresh)
    assert np.allclose(fresh.forward(ids)[0], adapted)
    with pytest.raises(ValueError, match="targets"):
        llm.add_lora(tiny(), targets=("nothing",))
