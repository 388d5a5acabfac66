"""train.py's explanation commands, which look inside a model: attention
maps (causal distributions, equal to a direct computation and to the
training forward's probabilities, refused past the context window); the
tokens, sample, attention and chat commands (what they print, the
checkpoint or GPT-2 weights and vocabulary they read, their argument
checks, the chat template, resets and cropping to the context window); and
the SVG pictures (line charts and heatmaps, well-formed, labels escaped).
What they show is checked against the model: the tokens' ids, the
probabilities before and after the temperature, the heatmap's values for
the layer and head asked for, the turns chat keeps."""
import io
import math
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llm
import train
from helpers import shared_file, untrained

TEXT = ("The capital of France is Paris. The capital of Italy is Rome. "
        "The cat sat on the mat because it was soft. ") * 20
TOK = llm.Tokenizer.train(TEXT, 300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a pretrain and an sft checkpoint (random weights)."""
    out = tmp_path_factory.mktemp("run")
    for seed, stage in ((1, "pretrain"), (2, "sft")):
        llm.save_checkpoint(str(out / f"{stage}.safetensors"), untrained(TOK.vocab_size, seed=seed), TOK,
                            stage=stage)
    return str(out)


# ---- attention_maps ------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, TOK.vocab_size - 1), min_size=1, max_size=32))
def test_attention_maps_are_causal_distributions(ids):
    maps = train.attention_maps(untrained(TOK.vocab_size), ids)
    T = len(ids)
    assert maps.shape == (2, 2, T, T)
    assert np.allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(maps >= 0)
    assert np.all(maps[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)


def test_attention_maps_match_a_direct_computation():
    model, ids = untrained(TOK.vocab_size), TOK.encode("The cat sat on the mat because it was soft.")
    maps = train.attention_maps(model, ids)
    # layer 0 by hand: softmax(q k^T / sqrt(D)) over the past, per head
    p, T, C, H = model.params, len(ids), 16, 2
    x = p["wte.weight"][ids] + p["wpe.weight"][:T]
    a = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    a = a * p["h.0.ln_1.weight"] + p["h.0.ln_1.bias"]
    qkv = a @ p["h.0.attn.c_attn.weight"] + p["h.0.attn.c_attn.bias"]
    for h in range(H):
        q = qkv[:, h * 8:(h + 1) * 8]
        k = qkv[:, C + h * 8:C + (h + 1) * 8]
        s = q @ k.T / math.sqrt(8) + np.triu(np.full((T, T), -np.inf), 1)
        want = np.exp(s - s.max(-1, keepdims=True))
        want /= want.sum(-1, keepdims=True)
        assert np.allclose(maps[0, h], want, atol=1e-5)
    # every layer: the training forward pass keeps the same probabilities
    # (the NumPy path's cache holds them; fastops' fused attention never forms them)
    previous = llm.set_backend("numpy")
    try:
        model.hidden(np.array([ids]))
    finally:
        llm.set_backend(previous)
    for i in range(model.config.n_layer):
        assert np.allclose(maps[i], model._cache[f"h.{i}.attn"][3][0], atol=1e-5)


def test_attention_maps_refuses_too_long_input():
    with pytest.raises(ValueError, match="context window"):
        train.attention_maps(untrained(TOK.vocab_size, block_size=4), [1, 2, 3, 4, 5])


# ---- the commands -----------------------------------------------------------------

def test_tokens_shows_chunks_pieces_and_ids(run, capsys):
    train.main(["tokens", "--text", "The cat sat", "--out", run])
    out = capsys.readouterr().out
    assert "pretrain.safetensors" in out
    assert "'The' | ' cat' | ' sat'" in out
    assert f"ids: {TOK.encode('The cat sat')}" in out
    for i in TOK.encode("The cat sat"):                                  # the table: each piece and its id
        assert re.search(re.escape(train.piece(TOK, i)) + r"\s+" + str(i) + "$", out, re.M), (i, out)


def test_tokens_without_a_checkpoint_uses_bytes(tmp_path, capsys):
    train.main(["tokens", "--text", "hé", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "byte tokenizer" in out
    assert "b'\\xc3'" in out and "ids: [104, 195, 169]" in out


def test_tokens_with_gpt2s_vocabulary(capsys):
    vocab = shared_file("gpt2.tiktoken")
    train.main(["tokens", "--text", "Hello world<|endoftext|>", "--special", "--gpt2", os.path.dirname(vocab)])
    out = capsys.readouterr().out
    assert "GPT-2's vocabulary" in out and "ids: [15496, 995, 50256]" in out


def test_sample_prints_the_distribution_and_a_reproducible_continuation(run, capsys):
    args = ["sample", "--out", run, "--prompt", "The cat", "--top", "5", "--seed", "3", "--max-tokens", "8"]
    llm.kernel_choice()                   # (a build's first use times its kernels, said in the first run only)
    train.main(args)
    out = capsys.readouterr().out
    model, *_ = llm.load_checkpoint(os.path.join(run, "pretrain.safetensors"))
    probs = llm.next_token_probs(model.forward(np.array([TOK.encode("The cat")]))[0][0, -1])
    best = int(np.argmax(probs))
    assert "stage pretrain" in out
    assert f"  1  {train.piece(TOK, best)}" in out and f"{probs[best]:.4f}" in out
    assert "continuation (temperature 1, seed 3" in out and "new tokens" in out
    train.main(args)                                     # the same seed: the same text
    again = capsys.readouterr().out
    assert again.split("\n\n[")[0] == out.split("\n\n[")[0]     # (the timing line differs)


def test_sample_shows_p_after_the_temperature_and_passes_top_k_on(run, capsys):
    train.main(["sample", "--out", run, "--prompt", "The cat", "--top", "3", "--temperature", "0.5",
                "--max-tokens", "1", "--seed", "0"])
    out = capsys.readouterr().out
    model, *_ = llm.load_checkpoint(os.path.join(run, "pretrain.safetensors"))
    logits = model.forward(np.array([TOK.encode("The cat")]))[0][0, -1]
    p, q = llm.next_token_probs(logits), llm.next_token_probs(logits, 0.5)
    best = int(np.argmax(p))
    first = next(line for line in out.splitlines() if line.strip().startswith("1 "))
    assert first.split()[-2:] == [f"{p[best]:.4f}", f"{q[best]:.4f}"], first
    continuations = []
    for seed in ("1", "2"):                            # top-k 1: greedy, whatever the seed
        train.main(["sample", "--out", run, "--prompt", "The cat", "--top-k", "1", "--max-tokens", "12", "--seed", seed])
        continuations.append(capsys.readouterr().out.split("repeats it):\n")[1].split("\n\n[")[0])
    assert continuations[0] == continuations[1]


def test_sample_choices_are_explicit(run, tmp_path, capsys):
    train.main(["sample", "--out", run, "--stage", "sft", "--max-tokens", "2", "--temperature", "0.5",
                "--top-k", "3", "--top-p", "0.9"])
    out = capsys.readouterr().out
    assert "sft.safetensors (stage sft" in out and "p sampled" in out
    with pytest.raises(SystemExit, match="no stage checkpoint"):
        train.main(["sample", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--top-p"):
        train.main(["sample", "--out", run, "--top-p", "0"])


def test_sample_runs_gpt2_weights(tmp_path, capsys):
    llm.export_gpt2(untrained(TOK.vocab_size), str(tmp_path), TOK)
    train.main(["sample", "--gpt2", str(tmp_path), "--prompt", "The", "--max-tokens", "3", "--seed", "0"])
    out = capsys.readouterr().out
    assert "GPT-2 from" in out and "continuation" in out


def test_attention_prints_top_tokens_and_writes_an_svg(run, capsys):
    text = "The cat sat on the mat because it was soft."
    train.main(["attention", "--out", run, "--text", text, "--layer", "-1", "--head", "0"])
    out = capsys.readouterr().out
    ids = TOK.encode(text)
    assert "layer 1, head 0" in out
    assert sum(1 for line in out.splitlines() if " <- " in line) == len(ids)
    svg = os.path.join(run, "attention-layer1-head0.svg")
    assert f"heatmap: {svg}" in out
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert len([e for e in root.iter() if e.tag.endswith("rect")]) >= len(ids) ** 2
    train.main(["attention", "--out", run, "--text", text])             # the average of everything
    assert "the average of all 2 layers" in capsys.readouterr().out
    ET.parse(os.path.join(run, "attention-layeravg-headavg.svg"))
    with pytest.raises(SystemExit, match="--head"):
        train.main(["attention", "--out", run, "--head", "7"])


def heatmap_values(svg):
    """The heatmap's cells (their titles end with the value), as a square matrix."""
    cells = [e for e in ET.parse(svg).getroot().iter() if e.tag.endswith("rect") and len(e)]
    values = [float(e[0].text.rsplit(": ", 1)[1]) for e in cells]
    n = math.isqrt(len(values))
    return np.array(values).reshape(n, n)


def test_attention_s_heatmap_is_the_layer_and_head_asked_for(run, capsys, tmp_path):
    text = "The cat sat on the mat."
    model, *_ = llm.load_checkpoint(os.path.join(run, "pretrain.safetensors"))
    maps = llm.to_numpy(train.attention_maps(model, TOK.encode(text))).astype(np.float64)   # (layers, heads, T, T)
    svg = str(tmp_path / "a.svg")
    train.main(["attention", "--out", run, "--text", text, "--layer", "average", "--head", "1", "--svg", svg])
    assert "the average of all 2 layers, head 1" in capsys.readouterr().out
    assert np.allclose(heatmap_values(svg), maps.mean(0)[1], atol=1e-4)
    train.main(["attention", "--out", run, "--text", text, "--layer", "0", "--head", "1", "--svg", svg])
    assert np.allclose(heatmap_values(svg), maps[0, 1], atol=1e-4)


# ---- chat ---------------------------------------------------------------------------

def scripted(lines):
    it = iter(lines)

    def input_fn(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return input_fn


def prompt_ids(tok, user):
    return [tok.special[llm.USER]] + tok.encode(user) + [tok.special[llm.ASSISTANT]]


def test_chat_ids_follow_the_template():
    ids = llm.chat_prompt(TOK, "capital of France?", [("hi", "hello there")])
    assert ids == (prompt_ids(TOK, "hi") + llm.encode_answer(TOK, "hello there") + [TOK.special[llm.END]]
                   + prompt_ids(TOK, "capital of France?"))


def test_chat_loop_with_reset_and_quit():
    out = io.StringIO()
    history = train.chat_loop(untrained(TOK.vocab_size), TOK,
                              scripted(["hi", "", "and Italy?", "/reset", "again", "/quit", "unread"]),
                              out, max_tokens=5, seed=0)
    text = out.getvalue()
    assert text.count("bot> ") == 3 and "(conversation cleared)" in text
    assert [u for u, _ in history] == ["again"]
    assert text.endswith("bot> " + history[0][1] + "\n")     # the answer as streamed


def test_chat_says_a_line_that_is_not_utf8_and_goes_on():
    out = io.StringIO()                  # (input() reads the bytes b"\xff" as "\udcff")
    history = train.chat_loop(untrained(TOK.vocab_size), TOK, scripted(["\udcff", "hi"]), out, max_tokens=2, seed=0)
    assert "not valid UTF-8" in out.getvalue() and [u for u, _ in history] == ["hi"]


@pytest.fixture
def seen(monkeypatch):
    """The prompts chat hands to llm.generate, in turn."""
    prompts, real = [], llm.generate

    def spy(model, prompt, *args, **kw):
        prompts.append(list(prompt))
        return real(model, prompt, *args, **kw)
    monkeypatch.setattr(llm, "generate", spy)
    return prompts


def test_chat_crops_old_turns_to_the_context_window(seen):
    out = io.StringIO()
    model = untrained(TOK.vocab_size, block_size=24)
    history = train.chat_loop(model, TOK, scripted(["The cat sat on the mat."] * 4), out, max_tokens=4, seed=1)
    assert all(len(p) <= 24 - 4 for p in seen)
    assert "forgotten" in out.getvalue() and len(history) < 4
    assert seen[-1][-len(prompt_ids(TOK, "The cat sat on the mat.")):] == prompt_ids(TOK, "The cat sat on the mat.")


def test_chat_keeps_each_turn_and_forgets_the_oldest_first(seen):
    said = ["a b", "c d", "e f", "g h"]
    history = train.chat_loop(untrained(TOK.vocab_size, block_size=256), TOK, scripted(said), io.StringIO(),
                              max_tokens=3, seed=1)
    assert [u for u, _ in history] == said
    for k in range(4):                                   # each turn sees every earlier one
        assert seen[k] == llm.chat_prompt(TOK, said[k], history[:k])
    said, out = ["The cat sat.", "The mat.", "Paris is soft.", "Rome sat on it."], io.StringIO()
    history = train.chat_loop(untrained(TOK.vocab_size, block_size=40), TOK, scripted(said), out,
                              max_tokens=4, seed=1)
    assert "forgotten" in out.getvalue() and len(history) < 4
    assert [u for u, _ in history] == said[-len(history):]


def test_chat_command_reads_the_sft_checkpoint(run, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", scripted(["hello"]))
    train.main(["chat", "--out", run, "--max-tokens", "3", "--seed", "0"])
    out = capsys.readouterr().out
    assert "sft.safetensors (stage sft" in out and "bot> " in out


# ---- SVG ------------------------------------------------------------------------------

numbers = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.lists(st.tuples(numbers, st.one_of(st.none(), numbers)),
                                                       max_size=12), max_size=4))
def test_svg_line_chart_is_well_formed(tmp_path_factory, series):
    path = str(tmp_path_factory.mktemp("svg") / "chart.svg")
    train.svg_line_chart(series, path, "loss <&>", "step", "loss")
    root = ET.parse(path).getroot()
    lines = [e for e in root.iter() if e.tag.endswith("polyline")]
    drawn = [pts for pts in series.values() if sum(y is not None for _, y in pts) > 1]
    assert len(lines) == len(drawn)


def test_svg_line_chart_draws_a_loss_history(tmp_path):
    history = [(s, 5.0 - s / 10, 4.9 - s / 10 if s % 5 == 0 else None) for s in range(1, 21)]
    path = train.svg_line_chart({"train": [(s, l) for s, l, _ in history],
                                 "val": [(s, v) for s, _, v in history]},
                                str(tmp_path / "loss.svg"), "pretrain", "step", "loss")
    text = open(path).read()
    ET.fromstring(text)
    assert text.count("<polyline") == 2 and ">train<" in text and ">val<" in text


def test_svg_heatmap_escapes_labels(tmp_path):
    labels = ["'<'", "'&'", repr("\x00"), "\x01odd"]
    path = train.svg_heatmap(np.eye(4), labels, labels, str(tmp_path / "h.svg"), "a <title>")
    root = ET.parse(path).getroot()
    assert len([e for e in root.iter() if e.tag.endswith("title")]) == 16
    with pytest.raises(ValueError, match="shape"):
        train.svg_heatmap(np.eye(3), labels, labels, str(tmp_path / "bad.svg"), "x")
