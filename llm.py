"""llm.py: a large language model built from nothing, in one file.

Read it top to bottom. It goes the way text goes through an LLM:

  1. Tokenizer      text -> bytes -> byte-pair-encoded token ids, and back
  2. Model          ids -> embeddings -> transformer blocks -> next-token
                    probabilities (GPT-2), each layer's backward pass written
                    by hand right after its forward pass
  3. Optimizer      AdamW, gradient clipping, the learning-rate schedule
  4. Sampling       turning probabilities back into text, with a KV cache
  5. Pretraining    learn language by predicting the next token
  6. Instruction tuning, 7. RLHF, 8. Task fine-tuning (LoRA)
  9. Checkpoints    safetensors files written with NumPy, atomically
 10. Fast kernels   fastops.c's C (and CUDA) kernels for the heavy math

Only NumPy is needed. The two heavy operations (the linear layers' matrix
products and causal attention) also have C kernels in fastops.c; when those
are built, llm.py uses them, and otherwise it runs the NumPy code.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import struct
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy

# The array module. Every array is created through `xp`, so a GPU array module
# with NumPy's API (CuPy) can take its place for the CUDA build.
xp = numpy


# =============================================================================
# 1. Tokenizer: text <-> token ids
# =============================================================================
# A model reads integers, not characters. Byte-level BPE (byte-pair encoding)
# starts from the 256 possible bytes, so any text can be encoded, then learns
# "merges": the most frequent adjacent pair of tokens becomes a new token,
# again and again, until the vocabulary has the size we asked for. Frequent
# words end up as one token, rare ones as several pieces.

# GPT-2's pre-tokenisation: text is first cut into chunks (contractions,
# runs of letters, runs of digits, runs of other symbols, whitespace) and
# merges never cross a chunk boundary, so " the" is learned once, not glued to
# its neighbours. GPT-2 writes \p{L} and \p{N}; Python's `re` spells letters
# [^\W\d_] and numbers \d (so the rare non-decimal numerals such as "²" count
# as letters here).
GPT2_SPLIT = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+"""
              r"""|\s+(?!\S)|\s+""")

ENDOFTEXT = "<|endoftext|>"
# The chat template of instruction tuning needs three more special tokens.
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (ENDOFTEXT, USER, ASSISTANT, END)
TOKENIZER_FORMAT = "llm-tokenizer-v1"


class Tokenizer:
    """Byte-level BPE. `ranks` maps a token's bytes to its id; a lower id was
    merged earlier, so encoding merges the lowest-ranked pair first (exactly
    how GPT-2's tiktoken encodes)."""

    def __init__(self, ranks: dict, special: dict, pattern: str = GPT2_SPLIT):
        self.ranks = ranks
        self.special = special                        # "<|end|>" -> id
        self.pattern = pattern
        self._split = re.compile(pattern)
        self.decoder = {i: b for b, i in ranks.items()}
        self.decoder.update({i: s.encode() for s, i in special.items()})
        self.vocab_size = max(self.decoder) + 1
        self._cache = {}                              # chunk bytes -> ids

    # ---- training ----------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int, special=SPECIAL_TOKENS):
        """Learn vocab_size - 256 - len(special) merges from text (fewer if
        the text runs out of pairs to merge)."""
        n_merges = vocab_size - 256 - len(special)
        if n_merges < 0:
            raise ValueError(f"vocab_size: expected at least {256 + len(special)}"
                             f" (256 bytes + {len(special)} special tokens), got {vocab_size}")
        # Count each distinct chunk once, weighted by how often it occurs.
        counts = {}
        for chunk in re.findall(GPT2_SPLIT, text):
            counts[chunk] = counts.get(chunk, 0) + 1
        words = [list(c.encode("utf-8")) for c in counts]
        freqs = list(counts.values())
        # pair -> total count, and pair -> the words that contain it.
        pair_count, where = {}, {}
        for w, (word, f) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                pair_count[pair] = pair_count.get(pair, 0) + f
                where.setdefault(pair, set()).add(w)
        # A heap of (-count, pair): the most frequent pair comes first and
        # equal counts are broken by the smaller pair of ids, a fixed rule,
        # so training is deterministic. Stale entries are skipped on pop.
        import heapq
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        pieces = [bytes([i]) for i in range(256)]
        while len(pieces) < 256 + n_merges and heap:
            negc, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -negc or negc == 0:
                continue
            new = len(pieces)
            pieces.append(pieces[pair[0]] + pieces[pair[1]])
            for w in where.pop(pair, ()):
                word, f = words[w], freqs[w]
                for p in zip(word, word[1:]):         # remove the old pairs
                    pair_count[p] -= f
                merged, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                        merged.append(new)
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                words[w] = merged
                for p in zip(merged, merged[1:]):     # and add the new ones
                    pair_count[p] = pair_count.get(p, 0) + f
                    where.setdefault(p, set()).add(w)
                    heapq.heappush(heap, (-pair_count[p], p))
            pair_count.pop(pair, None)
        ranks = {b: i for i, b in enumerate(pieces)}
        special = {s: len(pieces) + i for i, s in enumerate(special)}
        return cls(ranks, special)

    # ---- encoding and decoding ---------------------------------------------
    def _bpe(self, chunk: bytes) -> list:
        """Merge the chunk's bytes, lowest-ranked adjacent pair first."""
        ids = self._cache.get(chunk)
        if ids is not None:
            return ids
        parts = [chunk[i:i + 1] for i in range(len(chunk))]
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        ids = [self.ranks[p] for p in parts]
        if len(self._cache) < 200_000:
            self._cache[chunk] = ids
        return ids

    def encode(self, text: str, allow_special: bool = False) -> list:
        """Text -> ids. A special token's spelling inside ordinary text is
        encoded as ordinary text unless allow_special is True."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text: cannot be encoded as UTF-8 (character {e.object[e.start]!r}"
                             f" at index {e.start}, a lone surrogate)") from None
        if allow_special and self.special:
            pieces = re.split("(" + "|".join(map(re.escape, self.special)) + ")", text)
        else:
            pieces = [text]
        ids = []
        for piece in pieces:
            if piece in self.special and allow_special:
                ids.append(self.special[piece])
                continue
            for chunk in self._split.findall(piece):
                ids.extend(self._bpe(chunk.encode("utf-8")))
        return ids

    def decode_bytes(self, ids) -> bytes:
        out = []
        for i in ids:
            b = self.decoder.get(int(i))
            if b is None:
                raise ValueError(f"ids: token id {int(i)} is out of range"
                                 f" (the vocabulary has ids 0..{self.vocab_size - 1})")
            out.append(b)
        return b"".join(out)

    def decode(self, ids) -> str:
        """Ids -> text. A sequence that ends mid-character (or any invalid
        UTF-8) decodes to U+FFFD there rather than failing."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- files -------------------------------------------------------------
    @classmethod
    def from_tiktoken(cls, path: str, special=None):
        """Load a tiktoken rank file: one "base64-token rank" per line.
        For GPT-2's file, <|endoftext|> is 50256 and our chat tokens follow."""
        ranks = {}
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{n}: expected 'base64-token rank',"
                                     f" got {line[:60]!r}") from None
        if special is None:
            special = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        return cls(ranks, special)

    def to_json(self) -> str:
        """A human-readable, versioned description: tokens in id order, each
        token's bytes shown as latin-1 characters (one character per byte)."""
        tokens = [self.decoder[i].decode("latin-1") for i in range(len(self.ranks))]
        if sorted(self.ranks.values()) != list(range(len(self.ranks))):
            raise ValueError("tokenizer: ranks must be the ids 0..n-1")
        return json.dumps({"format": TOKENIZER_FORMAT, "pattern": self.pattern,
                           "special": self.special, "tokens": tokens},
                          ensure_ascii=True, indent=0)

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer"):
        try:
            d = json.loads(text)
            if d.get("format") != TOKENIZER_FORMAT:
                raise ValueError(f"expected format {TOKENIZER_FORMAT!r}, got {d.get('format')!r}")
            ranks = {t.encode("latin-1"): i for i, t in enumerate(d["tokens"])}
            return cls(ranks, {s: int(i) for s, i in d["special"].items()}, d["pattern"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: not a tokenizer file ({e})") from None

    def save(self, path: str):
        _atomic_write(path, self.to_json().encode())

    @classmethod
    def load(cls, path: str):
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read(), path)


def byte_tokenizer() -> "Tokenizer":
    """The tokenizer with no merges: one token per byte, plus the specials."""
    return Tokenizer.train("", 256 + len(SPECIAL_TOKENS))


# =============================================================================
# 2. Model: GPT-2, forward and backward
# =============================================================================
# ids (B, T) -> token embedding + position embedding -> n_layer blocks of
# [LayerNorm -> causal self-attention -> residual add,
#  LayerNorm -> MLP -> residual add] -> final LayerNorm -> logits (B, T, V)
# over the vocabulary: the model's guess for the next token at every position.
#
# Training needs the gradient of the loss with respect to every parameter.
# Each layer below is a pair: `*_forward` computes the output and keeps what
# the backward pass needs (its "cache"); `*_backward` takes the gradient of
# the loss w.r.t. the output and returns the gradients w.r.t. the inputs and
# parameters (the chain rule, one layer at a time).

@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64          # the context window: positions 0..block_size-1
    vocab_size: int = 256 + len(SPECIAL_TOKENS)
    dtype: str = "float32"        # "float64" for gradient checks
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, numpy.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd: expected a multiple of n_head={self.n_head}, got {self.n_embd}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {self.dtype!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")


# ---- the linear layer: y = x W + b ------------------------------------------
# W is stored (in, out), as in GPT-2's Conv1D. x is (M, K) with M = B*T rows.

def linear_forward(x, w, b):
    if _fast(x, w) and (b is None or _fast(b)):
        return fo_linear_forward(x, w, b)
    y = x @ w
    if b is not None:
        y += b
    return y


def linear_backward(dy, x, w):
    if _fast(dy, x, w):
        return fo_linear_backward(dy, x, w)
    # y = xW + b  =>  dx = dy W^T,  dW = x^T dy,  db = sum of dy over rows
    return dy @ w.T, x.T @ dy, dy.sum(0)


def linear_backward_input(dy, w):
    """dx alone, for a frozen weight (LoRA's base model)."""
    if _fast(dy, w):
        return fo_linear_backward_input(dy, w)
    return dy @ w.T


# ---- dropout: zero a fraction p of activations while training ---------------
# The survivors are scaled by 1/(1-p) so the expected value is unchanged.
# The mask is drawn by NumPy's generator, on the host even when training on
# the GPU: the same masks on both devices, and its state resumes exactly
# (the price on a GPU: one copy per mask).

def dropout_forward(x, p, rng):
    if p == 0.0 or rng is None:
        return x, None
    mask = xp.asarray(rng.random(x.shape) >= p).astype(x.dtype) / (1.0 - p)
    return x * mask, mask


def dropout_backward(dy, mask):
    return dy if mask is None else dy * mask


# ---- causal self-attention ---------------------------------------------------
# Each position asks a question (query q), every position offers a label (key
# k) and a message (value v). Position t reads a weighted average of the
# values of positions <= t (causal: never the future), weighted by
# softmax(q.k / sqrt(D)). q, k, v are (B, H, T, D): H heads of width D.

def causal_softmax(q, k, past=0):
    """softmax(q.k / sqrt(D)) over the keys each query may see: query i
    (at position past + i) sees keys 0..past+i. -> (B, H, Tq, Tk)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    att = (q @ k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])
    visible = xp.arange(Tk)[None, :] <= (past + xp.arange(Tq))[:, None]
    att = xp.where(visible, att, -xp.inf)
    att = xp.exp(att - att.max(-1, keepdims=True))
    return att / att.sum(-1, keepdims=True)


def attention_forward(q, k, v, dropout=0.0, rng=None):
    if _fast(q, k, v) and (dropout == 0.0 or rng is None) and (xp is numpy or q.shape[-1] <= 128):
        return fo_attention_forward(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = causal_softmax(q, k)                                        # (B, H, T, T)
    att_d, mask = dropout_forward(att, dropout, rng)
    return att_d @ v, (q, k, v, att, att_d, mask, scale)


def attention_backward(dy, cache):
    if isinstance(cache, dict):                 # from fo_attention_forward
        return fo_attention_backward(dy, cache)
    q, k, v, att, att_d, mask, scale = cache
    dv = att_d.swapaxes(-1, -2) @ dy
    datt = dropout_backward(dy @ v.swapaxes(-1, -2), mask)
    # softmax backward: ds_j = a_j (da_j - sum_i a_i da_i)
    ds = att * (datt - (datt * att).sum(-1, keepdims=True))
    return (ds @ k) * scale, (ds.swapaxes(-1, -2) @ q) * scale, dv


# ---- LayerNorm: normalise each vector to mean 0, variance 1, then scale -----

def layernorm_forward(x, w, b, eps=1e-5):
    if _fast(x, w, b):
        return fo_layernorm_forward(x, w, b, eps)
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dy, cache):
    if isinstance(cache, dict):                 # from fo_layernorm_forward
        return fo_layernorm_backward(dy, cache)
    xhat, rstd, w = cache
    dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0)
    db = dy.reshape(-1, xhat.shape[-1]).sum(0)
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, dw, db


# ---- GELU, the MLP's nonlinearity (GPT-2's tanh approximation) -------------
_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    if _fast(x):
        return fo_gelu_forward(x)
    t = xp.tanh(_GELU_C * (x + 0.044715 * (x * x * x)))    # x*x*x: float32 pow is slow
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    if isinstance(cache, dict):                 # from fo_gelu_forward
        return fo_gelu_backward(dy, cache)
    x, t = cache
    dt = _GELU_C * (1.0 + 3 * 0.044715 * (x * x))
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt)


# ---- cross-entropy: how surprised the model is by the true next token ------
# loss = mean over counted positions of -log p(target). `mask` (B, T) chooses
# which positions count (instruction tuning counts the answer only).

def log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)                       # no overflow in exp
    return z - xp.log(xp.exp(z).sum(-1, keepdims=True))


def cross_entropy_forward(logits, targets, mask=None):
    logp = log_softmax(logits)
    nll = -xp.take_along_axis(logp, targets[..., None], -1)[..., 0]  # (B, T)
    w = xp.ones(targets.shape, logits.dtype) if mask is None else mask.astype(logits.dtype)
    n = xp.maximum(w.sum(), 1)        # all masked: loss 0 (max, not an if: no wait for the GPU)
    return (nll * w).sum() / n, (logp, targets, w, n)


def cross_entropy_backward(cache):
    logp, targets, w, n = cache
    return logprob_backward(logp, targets, -w / n)


def logprob_backward(logp, targets, dlogp):
    """Gradient w.r.t. the logits of sum(dlogp * log softmax(logits)[target]):
    d log p_y / d z = onehot(y) - softmax(z). Cross-entropy uses it, and so do
    RLHF's policy gradients, which weight each token's log-probability."""
    dlogits = -xp.exp(logp) * dlogp[..., None]
    dlogits[tuple(xp.indices(targets.shape)) + (targets,)] += dlogp   # [b, t, targets[b, t]]
    return dlogits


def add_at(a, index, values):
    """a[index] += values, repeated indices adding up (numpy.add.at; CuPy
    spells it cupyx.scatter_add)."""
    if xp is numpy:
        numpy.add.at(a, index, values)
    else:
        import cupyx
        cupyx.scatter_add(a, index, values)


# ---- the whole model ---------------------------------------------------------

def param_shapes(cfg: GPTConfig) -> dict:
    """GPT-2's parameters, by GPT-2's names (without the `transformer.` prefix)."""
    C = cfg.n_embd
    shapes = {"wte.weight": (cfg.vocab_size, C), "wpe.weight": (cfg.block_size, C)}
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,)})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def init_params(cfg: GPTConfig, rng) -> dict:
    """GPT-2's initialisation: weights ~ N(0, 0.02), biases 0, LayerNorm
    scales 1, and the two projections that write into the residual stream
    scaled down by 1/sqrt(2 n_layer) so the stream's variance does not grow
    with depth."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.startswith("ln") or ".ln_" in name:
            value = xp.ones(shape) if name.endswith("weight") else xp.zeros(shape)
        elif name.endswith("bias"):
            value = xp.zeros(shape)
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
            value = xp.asarray(rng.normal(0.0, std, shape))
        params[name] = value.astype(cfg.dtype)
    return params


class GPT:
    """GPT-2. `params` maps names to arrays; forward() then backward() gives
    the gradients of the loss under the same names."""

    def __init__(self, config: GPTConfig, params: dict = None, seed: int = 0):
        self.config = config
        self.params = params if params is not None else init_params(config, numpy.random.default_rng(seed))
        self.rng = None            # a numpy Generator while training with dropout
        self.lora = {}             # weight name -> LoRA settings (section 8)
        self.merged_lora = {}      # adapters folded into their weights
        self.frozen = set()        # names whose gradients are not needed
        self._cache = None

    # A linear layer by parameter name, so LoRA (section 8) can adapt it.
    def _linear(self, name, x, caches):
        w, b = self.params[name + ".weight"], self.params.get(name + ".bias")
        y = linear_forward(x, w, b)
        if name in self.lora:
            y = y + lora_forward(self, name, x, caches)
        caches.append((name, x))
        return y

    def _linear_backward(self, dy, caches, grads):
        name, x = caches.pop()
        dx = None
        if name in self.lora:
            dx = lora_backward(self, name, dy, caches, grads)
        w = self.params[name + ".weight"]
        if name + ".weight" in self.frozen:
            dx_w = linear_backward_input(dy, w)
        else:
            dx_w, grads[name + ".weight"], grads[name + ".bias"] = linear_backward(dy, x, w)
        return dx_w if dx is None else dx_w + dx

    def hidden(self, idx):
        """ids (B, T) -> final hidden states (B, T, C), after ln_f, keeping
        the caches for backward_hidden()."""
        cfg, p = self.config, self.params
        idx = check_ids(idx, cfg.vocab_size, "idx")
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"idx: sequence length {T} exceeds the context window"
                             f" block_size={cfg.block_size}")
        C, H, drop, rng = cfg.n_embd, cfg.n_head, cfg.dropout, self.rng
        x = p["wte.weight"][idx] + p["wpe.weight"][:T]                  # (B, T, C)
        x, emb_mask = dropout_forward(x, drop, rng)
        caches, lin = [], []
        for i in range(cfg.n_layer):
            h = f"h.{i}."
            a, ln1 = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            qkv = self._linear(h + "attn.c_attn", a.reshape(B * T, C), lin)  # (B*T, 3C)
            q, k, v = (qkv.reshape(B, T, 3, H, C // H).transpose(2, 0, 3, 1, 4))  # 3 x (B, H, T, D)
            y, att = attention_forward(q, k, v, drop, rng)
            y = y.transpose(0, 2, 1, 3).reshape(B * T, C)               # heads side by side
            y, res1 = dropout_forward(self._linear(h + "attn.c_proj", y, lin), drop, rng)
            x = x + y.reshape(B, T, C)
            m, ln2 = layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
            f, gelu = gelu_forward(self._linear(h + "mlp.c_fc", m.reshape(B * T, C), lin))
            f, res2 = dropout_forward(self._linear(h + "mlp.c_proj", f, lin), drop, rng)
            x = x + f.reshape(B, T, C)
            caches.append((ln1, att, res1, ln2, gelu, res2))
        out, lnf = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])
        self._cache = dict(idx=idx, emb_mask=emb_mask, blocks=caches, lin=lin, lnf=lnf)
        return out

    def backward_hidden(self, dh, grads=None) -> dict:
        """Gradient of the loss w.r.t. the hidden states (B, T, C) -> gradients
        of every parameter (added into `grads` when given)."""
        cfg, c = self.config, self._cache
        if c is None:
            raise RuntimeError("backward: call forward() first")
        grads = {} if grads is None else grads
        dh = dh.astype(cfg.dtype, copy=False)
        B, T = c["idx"].shape
        C, H = cfg.n_embd, cfg.n_head
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(dh, c["lnf"])
        lin = c["lin"]
        for i in reversed(range(cfg.n_layer)):
            h = f"h.{i}."
            ln1, att, res1, ln2, gelu, res2 = c["blocks"][i]
            # x = x + mlp(ln_2(x)): the residual passes dx through unchanged
            df = self._linear_backward(dropout_backward(dx.reshape(B * T, C), res2), lin, grads)
            dm = self._linear_backward(gelu_backward(df, gelu), lin, grads)
            dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layernorm_backward(dm.reshape(B, T, C), ln2)
            dx = dx + dm
            # x = x + attn(ln_1(x))
            dy = self._linear_backward(dropout_backward(dx.reshape(B * T, C), res1), lin, grads)
            dy = dy.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)     # (B, H, T, D)
            dq, dk, dv = attention_backward(dy, att)
            dqkv = xp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B * T, 3 * C)
            da = self._linear_backward(dqkv, lin, grads)
            da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layernorm_backward(da.reshape(B, T, C), ln1)
            dx = dx + da
        dx = dropout_backward(dx, c["emb_mask"])
        dwte = grads.get("wte.weight")
        dwte = xp.zeros_like(self.params["wte.weight"]) if dwte is None else dwte
        add_at(dwte, c["idx"], dx)                     # each used row gets its gradient
        grads["wte.weight"] = dwte
        grads["wpe.weight"] = xp.zeros_like(self.params["wpe.weight"])
        grads["wpe.weight"][:T] = dx.sum(0)
        for name in self.frozen:
            grads.pop(name, None)
        return grads

    def forward(self, idx, targets=None, mask=None):
        """ids (B, T) -> logits (B, T, V), and the mean cross-entropy loss
        when targets (B, T) are given (over positions where mask is nonzero)."""
        h = self.hidden(idx)
        B, T, C = h.shape
        wte = self.params["wte.weight"]
        # The output head is tied to the token embedding: logits = h wte^T.
        logits = linear_forward(h.reshape(B * T, C), wte.T, None).reshape(B, T, -1)
        self._cache["h"] = h
        if targets is None:
            self._cache["ce"] = None
            return logits, None
        targets = check_ids(targets, self.config.vocab_size, "targets")
        if targets.shape != (B, T):
            raise ValueError(f"targets: expected shape {(B, T)}, got {targets.shape}")
        if mask is not None and xp.shape(mask) != (B, T):
            raise ValueError(f"mask: expected shape {(B, T)}, got {xp.shape(mask)}")
        loss, self._cache["ce"] = cross_entropy_forward(logits, targets, mask)
        return logits, float(loss)

    def backward(self, dlogits=None, dh=None) -> dict:
        """Gradients of the loss from the last forward(), by parameter name.
        `dlogits` replaces the cross-entropy gradient (RLHF uses its own);
        `dh` adds a gradient on the hidden states (from a value head)."""
        c = self._cache
        if c is None or (dlogits is None and c.get("ce") is None):
            raise RuntimeError("backward: call forward() with targets first")
        if dlogits is None:
            dlogits = cross_entropy_backward(c["ce"])
        dlogits = dlogits.astype(self.config.dtype, copy=False)   # a float64 scalar must not promote
        h = c["h"]
        B, T, C = h.shape
        wte = self.params["wte.weight"]
        dhead, dwte_t, _ = linear_backward(dlogits.reshape(B * T, -1), h.reshape(B * T, C), wte.T)
        grads = {"wte.weight": dwte_t.T.copy()}     # the head's share of wte's gradient
        dhead = dhead.reshape(B, T, C)
        return self.backward_hidden(dhead if dh is None else dhead + dh, grads)

    def num_params(self) -> int:
        return sum(v.size for v in self.params.values())


def check_ids(idx, vocab_size, name):
    """Token ids must be a 2-D integer array of in-range ids. Ids from the
    host are checked there, before they go to the GPU (where out-of-range
    ids would wrap around silently, and checking them would wait for it)."""
    a = idx if isinstance(idx, xp.ndarray) else numpy.asarray(idx)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected a (batch, time) array of token ids, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer token ids, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab_size):
        raise ValueError(f"{name}: token ids must be in 0..{vocab_size - 1},"
                         f" got {int(a.min())}..{int(a.max())}")
    return xp.asarray(a).astype(xp.int64, copy=False)


# =============================================================================
# 3. Optimizer: AdamW, gradient clipping, learning-rate schedule
# =============================================================================
# Adam keeps, per parameter, running averages of the gradient (m) and of its
# square (v), and steps by m / sqrt(v): a per-weight step size. AdamW's
# weight decay shrinks weights directly ("decoupled" from the gradient), and
# only the 2-D matrices are decayed, never biases or LayerNorm scales.

@dataclass
class AdamW:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    t: int = 0
    m: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)

    def step(self, params: dict, grads: dict, lr: float = None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t         # bias corrections
        for name, g in grads.items():
            p = params[name]
            if name not in self.m:
                self.m[name], self.v[name] = xp.zeros_like(p), xp.zeros_like(p)
            m, v = self.m[name], self.v[name]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            if p.ndim >= 2 and self.weight_decay:
                p *= 1.0 - lr * self.weight_decay
            p -= (lr / c1) * m / (xp.sqrt(v / c2) + self.eps)


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients down together if their global L2 norm exceeds
    max_norm (one bad batch cannot throw the weights far). Returns the norm."""
    norm = math.sqrt(float(sum((g.astype(xp.float64) ** 2).sum() for g in grads.values())))
    if max_norm and norm > max_norm:
        for k in grads:              # grads[k] *=: in place, and a 0-d scalar too
            grads[k] *= max_norm / (norm + 1e-6)
    return norm


def lr_schedule(step: int, lr: float, min_lr: float, warmup: int, max_iters: int) -> float:
    """Linear warmup from 0 to lr, then cosine decay down to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_iters:
        return min_lr
    progress = (step - warmup) / max(1, max_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# =============================================================================
# 4. Sampling: from probabilities back to text
# =============================================================================
# Generation feeds the model its own output, one token at a time. Recomputing
# the whole prefix each time is wasteful: the keys and values of earlier
# positions never change (attention is causal), so a KV cache keeps them,
# the prompt is processed once ("prefill"), and each new token costs one
# position's work.

def _attention_cached(q, k, v, past, record=None):
    """q (B, H, Tn, D) for positions past..past+Tn-1; k, v (B, H, past+Tn, D).
    The attention probabilities (B, H, Tn, Tk) are appended to `record`
    when it is a list (attention_maps() below reads them)."""
    att = causal_softmax(q, k, past)                                  # (B, H, Tn, Tk)
    if record is not None:
        record.append(att)
    return att @ v


def forward_cached(model: GPT, idx, kv: list, record=None):
    """Logits for new ids (B, Tn) given the keys and values of earlier
    positions in kv (one (k, v) pair per layer, extended in place).
    `record`, a list, receives each layer's attention probabilities."""
    cfg, p = model.config, model.params
    B, Tn = idx.shape
    past = 0 if not kv else kv[0][0].shape[2]
    C, H = cfg.n_embd, cfg.n_head
    x = p["wte.weight"][idx] + p["wpe.weight"][past:past + Tn]
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        a, _ = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        qkv = model._linear(h + "attn.c_attn", a.reshape(B * Tn, C), [])
        q, k, v = qkv.reshape(B, Tn, 3, H, C // H).transpose(2, 0, 3, 1, 4)
        if len(kv) <= i:
            kv.append((k, v))
        else:
            kv[i] = (xp.concatenate([kv[i][0], k], 2), xp.concatenate([kv[i][1], v], 2))
        y = _attention_cached(q, *kv[i], past, record).transpose(0, 2, 1, 3).reshape(B * Tn, C)
        x = x + model._linear(h + "attn.c_proj", y, []).reshape(B, Tn, C)
        m, _ = layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        f, _ = gelu_forward(model._linear(h + "mlp.c_fc", m.reshape(B * Tn, C), []))
        x = x + model._linear(h + "mlp.c_proj", f, []).reshape(B, Tn, C)
    out, _ = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])
    return out @ p["wte.weight"].T                                     # (B, Tn, V)


def attention_maps(model: GPT, ids):
    """Where each token looks: ids (T,) -> the attention probabilities of
    every layer and head, an array (n_layer, n_head, T, T). Row t of
    maps[l, h] is how head h of layer l splits position t's attention over
    positions 0..t; each row sums to 1 and everything right of the diagonal
    (the future) is 0."""
    idx = check_ids(ids, model.config.vocab_size, "ids")
    if idx.shape[0] != 1:
        raise ValueError(f"ids: expected one sequence, got a batch of {idx.shape[0]}")
    if idx.shape[1] > model.config.block_size:
        raise ValueError(f"ids: sequence length {idx.shape[1]} exceeds the context window"
                         f" block_size={model.config.block_size}")
    record = []
    forward_cached(model, idx, [], record)
    return xp.stack([att[0] for att in record])                       # (L, H, T, T)


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """Logits (V,) -> the distribution to sample from. Temperature < 1
    sharpens it, top-k keeps the k likeliest tokens, top-p (nucleus) keeps the
    smallest set whose probability reaches p."""
    logits = xp.asarray(logits, dtype=xp.float64) / temperature
    if top_k is not None and top_k < logits.size:
        kth = xp.sort(logits)[-top_k]
        logits = xp.where(logits < kth, -xp.inf, logits)
    probs = xp.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        order = xp.argsort(-probs, kind="stable")
        keep = xp.cumsum(probs[order]) - probs[order] < top_p   # mass before this token
        probs[order[~keep]] = 0.0
        probs /= probs.sum()
    return probs


def generate(model: GPT, prompt, max_new_tokens=100, temperature=1.0, top_k=None,
             top_p=None, stop=(), seed=None, rng=None):
    """Yield new token ids one by one (streaming). temperature=0 is greedy.
    Generation ends after max_new_tokens or at a token in `stop` (not yielded).
    A prompt longer than the context window is cropped to its last block_size
    tokens; once the window is full, each step re-reads the last block_size
    tokens, as the model only ever saw that many."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prompt: expected at least one token id")
    check_ids(prompt, model.config.vocab_size, "prompt")
    for name, v in (("temperature", temperature), ("max_new_tokens", max_new_tokens)):
        if v < 0:
            raise ValueError(f"{name}: expected >= 0, got {v}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
    rng = rng if rng is not None else numpy.random.default_rng(seed)
    block = model.config.block_size
    tokens = prompt[-block:]
    kv = []
    logits = forward_cached(model, xp.asarray([tokens]), kv)[0, -1]
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = int(xp.argmax(logits))
        else:
            probs = next_token_probs(logits, temperature, top_k, top_p)
            nxt = int(rng.choice(probs.size, p=xp_to_numpy(probs)))
        if nxt in stop:
            return
        yield nxt
        tokens.append(nxt)
        if len(tokens) > block:                  # window full: re-read the last block tokens
            tokens = tokens[-block:]
            kv = []
            logits = forward_cached(model, xp.asarray([tokens]), kv)[0, -1]
        else:
            logits = forward_cached(model, xp.asarray([[nxt]]), kv)[0, -1]


def generate_batch(model: GPT, prompts, max_new_tokens=64, temperature=0.0, stop=(), rng=None):
    """Many prompts at once -> (token lists, ended flags). Prompts of equal
    length share one batch, so answering a test set costs a few batched
    forward passes per token instead of one pass per prompt per token.
    Sampling is plain temperature sampling (Gumbel-max: argmax of logits/T
    plus Gumbel noise draws from softmax(logits/T)). A row ends at a stop
    token (ended) or when max_new_tokens or the context window runs out."""
    rng = rng if rng is not None else numpy.random.default_rng(0)
    outs, ended = [None] * len(prompts), [False] * len(prompts)
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for length, rows in sorted(groups.items()):
        if length > model.config.block_size:
            raise ValueError(f"prompts: a prompt of {length} tokens exceeds block_size={model.config.block_size}")
        kv, done = [], numpy.zeros(len(rows), bool)
        got = [[] for _ in rows]
        logits = forward_cached(model, xp.asarray([prompts[i] for i in rows]), kv)[:, -1]
        for step in range(min(max_new_tokens, model.config.block_size - length + 1)):
            if temperature == 0:
                nxt = xp_to_numpy(xp.argmax(logits, -1))
            else:
                g = -numpy.log(-numpy.log(rng.random(logits.shape)))
                nxt = numpy.argmax(xp_to_numpy(logits) / temperature + g, -1)
            for j, t in enumerate(nxt):
                if not done[j]:
                    if int(t) in stop:
                        done[j] = True
                    else:
                        got[j].append(int(t))
            if done.all() or length + step > model.config.block_size - 1:   # window full
                break
            logits = forward_cached(model, xp.asarray(nxt[:, None]), kv)[:, -1]
        for j, i in enumerate(rows):
            outs[i], ended[i] = got[j], bool(done[j])
    return outs, ended

# =============================================================================
# 5. Pretraining: learn language by predicting the next token
# =============================================================================
# Take random windows of block_size+1 tokens from the corpus; the input is the
# first block_size, the target the same window shifted by one. Minimising the
# cross-entropy makes the model's probabilities match the text's statistics.

@dataclass
class TrainConfig:
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1            # micro-batches per optimizer step
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337


def get_batch(data, block_size, batch_size, rng):
    """Random windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1]."""
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    x = numpy.stack([data[i:i + block_size] for i in ix])
    y = numpy.stack([data[i + 1:i + 1 + block_size] for i in ix])
    return xp.asarray(x), xp.asarray(y)


def estimate_loss(model: GPT, data, batch_size, eval_iters, seed=0) -> float:
    """Mean loss over fixed random windows (the same ones every time)."""
    rng, drop = numpy.random.default_rng(seed), model.rng
    model.rng = None                              # no dropout while measuring
    bs = min(model.config.block_size, len(data) - 1)
    losses = [model.forward(*get_batch(data, bs, batch_size, rng))[1] for _ in range(eval_iters)]
    model.rng = drop
    return float(numpy.mean(losses))


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where it stopped."""
    step: int = 0
    opt: AdamW = None
    rng_state: dict = None
    history: list = field(default_factory=list)    # (step, train loss, val loss)


def lm_loss(model: GPT, batch):
    """The language-modelling loss and its gradients; batch = (x, y[, mask])."""
    _, loss = model.forward(*batch)
    return loss, model.backward()


def train_steps(model: GPT, state: TrainState, tc: TrainConfig, batch_fn, loss_fn=lm_loss,
                on_eval=None, save=None, stop_at=None, log=None):
    """The training loop shared by every stage: batch -> loss and gradients
    -> clip -> AdamW step, with the learning-rate schedule, gradient
    accumulation, and an evaluation every eval_interval steps. batch_fn(rng)
    makes a batch, loss_fn(model, batch) -> (loss, grads), on_eval(step) ->
    validation loss, and save() writes a checkpoint after each evaluation,
    once the state is complete. Stops at max_iters (or stop_at)."""
    rng = numpy.random.default_rng(tc.seed)
    if state.rng_state is not None:
        rng.bit_generator.state = state.rng_state
    if state.opt is None:
        state.opt = AdamW(tc.learning_rate, (0.9, tc.beta2), weight_decay=tc.weight_decay)
    if model.config.dropout:
        model.rng = rng
    end = tc.max_iters if stop_at is None else min(stop_at, tc.max_iters)
    t0, tokens = time.time(), 0
    while state.step < end:
        lr = lr_schedule(state.step, tc.learning_rate, tc.min_lr, tc.warmup_iters, tc.max_iters)
        grads, loss = None, 0.0
        for _ in range(tc.grad_accum):
            batch = batch_fn(rng)
            l, g = loss_fn(model, batch)
            loss += l / tc.grad_accum
            tokens += batch[0].size
            if grads is None:
                grads = g
            else:
                for k in grads:
                    grads[k] += g[k]
        if tc.grad_accum > 1:
            for k in grads:
                grads[k] /= tc.grad_accum
        clip_grad_norm(grads, tc.grad_clip)
        state.opt.step(model.params, grads, lr)
        state.step += 1
        state.rng_state = rng.bit_generator.state
        val = None
        if on_eval and (state.step % tc.eval_interval == 0 or state.step == tc.max_iters):
            val = on_eval(state.step)
        state.history.append((state.step, loss, val))
        if save and val is not None:
            save()
        if log:
            log(state.step, end, loss, val, tokens / max(time.time() - t0, 1e-9), time.time() - t0)
    model.rng = None
    return state


class Progress:
    """One updating line: step, loss, val loss, bits per byte, tokens/s,
    elapsed time and ETA."""

    def __init__(self, stage: str, bytes_per_token: float = None, stream=sys.stdout):
        self.stage, self.bpt, self.stream = stage, bytes_per_token, stream
        self.val = None
        self.tty = stream.isatty()
        self.last = time.time()

    def __call__(self, step, end, loss, val, tok_s, elapsed):
        if val is not None:
            self.val = val
        now = time.time()
        pause = 0.5 if self.tty else 15.0            # a log file gets a line every 15 s
        if step < end and val is None and now - self.last < pause:
            return
        self.last = now
        eta = elapsed / max(step, 1) * (end - step) if step else 0.0
        line = f"{self.stage} step {step}/{end} loss {loss:.4f}"
        if self.val is not None:
            line += f" val {self.val:.4f}"
            if self.bpt:
                line += f" bpb {bits_per_byte(self.val, self.bpt):.3f}"
        line += f" | {tok_s:,.0f} tok/s | {elapsed:.0f}s elapsed, ETA {eta:.0f}s"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if step >= end else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Bits per byte: the tokenizer-independent way to compare models."""
    return loss_nats_per_token / math.log(2) / bytes_per_token


def pretrain(text: str, out: str, cfg: GPTConfig, tc: TrainConfig, resume=False,
             stop_at=None, log=None, tokenizer: Tokenizer = None, on_ready=None) -> dict:
    """Pretrain a GPT on `text`: the first 90% trains (and trains the
    tokenizer, unless one is given), the last 10% validates. Writes
    out/pretrain.safetensors at every evaluation and at the end, and
    out/metrics.json. With resume=True, continues from the checkpoint so the
    run ends with exactly the weights an uninterrupted run would have."""
    ckpt = os.path.join(out, "pretrain.safetensors")
    cut = int(len(text) * 0.9)
    train_text, val_text = text[:cut], text[cut:]
    if resume and os.path.exists(ckpt):
        model, tokenizer, state, _ = load_checkpoint(ckpt)
    else:
        if tokenizer is None:
            tokenizer = (byte_tokenizer() if cfg.vocab_size <= 256 + len(SPECIAL_TOKENS)
                         else Tokenizer.train(train_text, cfg.vocab_size))
        cfg = GPTConfig(**{**asdict(cfg), "vocab_size": tokenizer.vocab_size})
        model, state = GPT(cfg, seed=tc.seed), TrainState()
    train_ids = numpy.asarray(tokenizer.encode(train_text), numpy.int64)
    val_ids = numpy.asarray(tokenizer.encode(val_text), numpy.int64)
    if min(len(train_ids), len(val_ids)) <= model.config.block_size:
        raise ValueError(f"text: too short for block_size={model.config.block_size}"
                         f" ({len(train_ids)} training and {len(val_ids)} validation tokens)")
    bpt = len(val_text.encode("utf-8")) / len(val_ids)                 # bytes per token
    if on_ready:
        on_ready(bpt)
    T, B = model.config.block_size, tc.batch_size

    def save():
        save_checkpoint(ckpt, model, tokenizer, state, stage="pretrain", train=asdict(tc))

    t0 = time.time()
    train_steps(model, state, tc, lambda rng: get_batch(train_ids, T, B, rng),
                on_eval=lambda step: estimate_loss(model, val_ids, B, tc.eval_iters),
                save=save, stop_at=stop_at, log=log)
    if state.step < tc.max_iters:                   # stopped early: keep the state
        save()
        return {}
    val = next(v for _, _, v in reversed(state.history) if v is not None)
    wall = time.time() - t0
    metrics = {"train_loss": estimate_loss(model, train_ids, B, tc.eval_iters),
               "val_loss": val, "bits_per_byte": bits_per_byte(val, bpt),
               "steps": state.step, "tokens_per_second": state.step * tc.grad_accum * B * T / wall,
               "wall_seconds": wall, "params": model.num_params(), "bytes_per_token": bpt}
    _atomic_write(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=2).encode())
    return metrics


# =============================================================================
# 6. Instruction tuning: from text continuer to assistant
# =============================================================================
# A pretrained model continues text; it does not answer. Instruction tuning
# (supervised fine-tuning, SFT) trains it on conversations written in a chat
# template: <|user|> question <|assistant|> answer <|end|>. The loss counts
# the answer's tokens only: the model learns to answer, not to ask. At
# inference the prompt ends with <|assistant|> and generation stops at <|end|>.

def read_jsonl(path: str, fields) -> list:
    """One JSON object per line, each with the given string fields. A
    malformed line is a ValueError naming the file and the line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(r).__name__}")
            for k in fields:
                if not isinstance(r.get(k), str):
                    raise ValueError(f"{path}:{n}: expected a string field {k!r}, got {r.get(k)!r}")
            records.append(r)
    return records


def chat_prompt(tok: Tokenizer, prompt: str) -> list:
    """<|user|> prompt <|assistant|>: what the model sees before answering."""
    s = tok.special
    return [s[USER]] + tok.encode(prompt) + [s[ASSISTANT]]


def chat_example(tok: Tokenizer, prompt: str, answer: str, ended: bool = True):
    """-> (ids, n): the conversation's ids; ids[n:] is the answer (with <|end|>)."""
    head = chat_prompt(tok, prompt)
    return head + tok.encode(answer) + ([tok.special[END]] if ended else []), len(head)


def pad_batch(examples, pad: int, block_size: int):
    """Examples (ids, n) -> x, y (B, T) and a mask (B, T) that is 1 where y
    is an answer token. Short rows are padded (masked out); long ones lose
    their oldest tokens, so the answer always fits."""
    rows = []
    for ids, n in examples:
        cut = max(0, len(ids) - (block_size + 1))
        rows.append((ids[cut:], max(n - cut, 1)))
    T = max(len(ids) for ids, _ in rows) - 1
    x = numpy.full((len(rows), T), pad, numpy.int64)
    y = numpy.full((len(rows), T), pad, numpy.int64)
    mask = numpy.zeros((len(rows), T), numpy.float32)
    for i, (ids, n) in enumerate(rows):
        x[i, :len(ids) - 1], y[i, :len(ids) - 1] = ids[:-1], ids[1:]
        mask[i, n - 1:len(ids) - 1] = 1.0        # y[t] = ids[t+1] is an answer token
    return xp.asarray(x), xp.asarray(y), xp.asarray(mask)


def answers(model: GPT, tok: Tokenizer, prompts, max_new_tokens: int = 48, **sampling):
    """The model's answers to prompts -> (texts, ended): ended is True where
    it closed its turn with <|end|>. Greedy unless a temperature is given."""
    stop = {tok.special[END], tok.special[USER], tok.special[ENDOFTEXT]}
    ids, ended = generate_batch(model, [chat_prompt(tok, p) for p in prompts], max_new_tokens,
                                stop=stop, **sampling)
    return [tok.decode(t) for t in ids], ended


def sft_batches(tok: Tokenizer, records, batch_size: int, block_size: int, replay=None,
                replay_fraction: float = 0.0):
    """batch_fn for train_steps: random conversations with the answer masked
    in. With replay (pretraining token ids), that fraction of each batch is
    plain pretraining text, all of it counted: without it, a small model
    forgets the facts it was never asked about while it learns to answer."""
    examples = [chat_example(tok, r["prompt"], r["response"]) for r in records]
    pad = tok.special[END]
    n_replay = int(round(batch_size * replay_fraction)) if replay is not None else 0

    def batch_fn(rng):
        pick = rng.integers(0, len(examples), batch_size - n_replay)
        rows = [examples[i] for i in pick]
        for i in (rng.integers(0, len(replay) - block_size - 1, n_replay) if n_replay else ()):
            rows.append((list(replay[i:i + block_size + 1]), 1))
        return pad_batch(rows, pad, block_size)
    return batch_fn


# =============================================================================
# 7. RLHF: learning from preferences
# =============================================================================
# People can say which of two answers is better more easily than they can
# write the best answer. RLHF turns such preferences into training signal:
#   1. a reward model learns to score answers so that preferred ones win;
#   2. PPO lets the instruction-tuned model (the policy) answer, scores the
#      answers with the reward model, and nudges the policy toward higher
#      scores, with a KL penalty that keeps it close to where it started
#      (the frozen reference) so it cannot game the reward model.
# DPO reaches the same goal without a reward model or sampling: it raises the
# probability of the preferred answer relative to the rejected one directly.

def preference_example(tok: Tokenizer, r: dict, which: str):
    """A preference pair's answer as a conversation. The "unended" flaw is an
    answer that never closes its turn: it gets no <|end|>."""
    ended = which == "chosen" or r.get("flaw") != "unended"
    return chat_example(tok, r["prompt"], r[which], ended)


# ---- the reward model: the transformer with a scalar head -------------------
# The score is read from the hidden state of the last token: by then the
# model has seen the whole conversation. The head lives in the same params
# dict as `score.weight` (C,) and `score.bias` ().

def add_head(model: GPT, name: str, rng=None):
    C, dtype = model.config.n_embd, model.config.dtype
    std = 0.0 if rng is None else 1.0 / math.sqrt(C)
    w = rng.normal(0.0, std, C) if rng is not None else numpy.zeros(C)
    model.params[name + ".weight"] = xp.asarray(w).astype(dtype)
    model.params[name + ".bias"] = xp.zeros((), dtype)


def head_forward(model: GPT, name: str, h, pos):
    """h (B, T, C), pos (B, k) positions -> head values (B, k)."""
    rows = xp.arange(h.shape[0])[:, None]
    return h[rows, pos] @ model.params[name + ".weight"] + model.params[name + ".bias"]


def head_backward(model: GPT, name: str, h, pos, dout, grads):
    """-> dh (B, T, C); the head's own gradients go into grads."""
    rows = xp.arange(h.shape[0])[:, None]
    hp = h[rows, pos]                                                 # (B, k, C)
    grads[name + ".weight"] = (dout[..., None] * hp).reshape(-1, hp.shape[-1]).sum(0)
    grads[name + ".bias"] = dout.sum()
    dh = xp.zeros_like(h)
    add_at(dh, (rows, pos), dout[..., None] * model.params[name + ".weight"])
    return dh


def pair_examples(tok: Tokenizer, pairs) -> list:
    """Preference pairs -> conversations: all chosen answers, then all rejected."""
    return ([preference_example(tok, r, "chosen") for r in pairs]
            + [preference_example(tok, r, "rejected") for r in pairs])


def reward_batch(tok: Tokenizer, examples, block_size: int):
    """Conversations -> ids (B, T), right-padded, and each row's last
    position. The reward model reads the whole conversation, <|end|>
    included (an answer that never ends must be told from one that does);
    a conversation longer than the context keeps its last block_size tokens."""
    rows = [ids[-block_size:] for ids, _ in examples]
    x = numpy.full((len(rows), max(map(len, rows))), tok.special[END], numpy.int64)
    for i, ids in enumerate(rows):
        x[i, :len(ids)] = ids
    return xp.asarray(x), xp.asarray([len(ids) - 1 for ids in rows])


def reward_scores(model: GPT, x, last):
    """The reward of each row: the score head at its last token."""
    h = model.hidden(x)
    return head_forward(model, "score", h, last[:, None])[:, 0], h


def reward_loss(model: GPT, batch):
    """Bradley-Terry: P(chosen beats rejected) = sigmoid(r_c - r_r); the loss
    is -log of it, averaged over the pairs. batch = (ids, last) from
    reward_batch(), chosen rows first."""
    x, last = batch
    r, h = reward_scores(model, x, last)
    n = len(r) // 2
    margin = r[:n] - r[n:]
    loss = float(xp.logaddexp(0.0, -margin).mean())                # -log sigmoid(margin)
    dmargin = -1.0 / (1.0 + xp.exp(margin)) / n                      # d loss / d margin
    dr = xp.concatenate([dmargin, -dmargin])
    grads = {}
    dh = head_backward(model, "score", h, last[:, None], dr[:, None], grads)
    return loss, model.backward_hidden(dh, grads)


def reward_accuracy(model: GPT, tok: Tokenizer, pairs, batch_size=32) -> float:
    """The share of pairs whose chosen answer scores above the rejected."""
    wins = 0
    for i in range(0, len(pairs), batch_size):
        batch = reward_batch(tok, pair_examples(tok, pairs[i:i + batch_size]), model.config.block_size)
        r, _ = reward_scores(model, *batch)
        n = len(r) // 2
        wins += int((r[:n] > r[n:]).sum())
    return wins / max(len(pairs), 1)


def score_conversations(rm: GPT, tok: Tokenizer, examples):
    """Reward-model scores of conversations (ids, n) -> (B,)."""
    return reward_scores(rm, *reward_batch(tok, examples, rm.config.block_size))[0]


def score_answers(rm: GPT, tok: Tokenizer, prompts, answers, ended) -> list:
    """Reward-model scores of (prompt, answer text) pairs."""
    ex = [chat_example(tok, p, a, e) for p, a, e in zip(prompts, answers, ended)]
    return [float(s) for s in score_conversations(rm, tok, ex)]


# ---- PPO -------------------------------------------------------------------

@dataclass
class PPOConfig:
    iters: int = 40                # rollouts
    prompts_per_iter: int = 16
    epochs: int = 4                # passes over each rollout
    minibatches: int = 2
    max_new_tokens: int = 24
    learning_rate: float = 1e-5
    kl_coef: float = 0.3
    target_kl: float = None        # set to adapt kl_coef toward this KL
    clip: float = 0.2              # ratio clip, and value clip
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    seed: int = 0


def sequence_logprobs(model: GPT, x, y):
    """log p(y_t | x_<=t) for every position -> (B, T), and log-softmax for backward."""
    logits, _ = model.forward(x)
    logp = log_softmax(logits)
    return xp.take_along_axis(logp, y[..., None], -1)[..., 0], logp


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over each row's answer tokens:
    A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t."""
    adv = xp.zeros_like(rewards)
    last = xp.zeros(rewards.shape[0], rewards.dtype)
    next_v = xp.zeros(rewards.shape[0], rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m
        adv[:, t] = last
        next_v = xp.where(m > 0, values[:, t], next_v)
    return adv, adv + values


def sample_answers(policy: GPT, tok: Tokenizer, prompts, pc: PPOConfig, rng):
    """The policy answers each prompt by sampling -> (conversations, texts, ended)."""
    stop = {tok.special[END], tok.special[USER], tok.special[ENDOFTEXT]}
    heads = [chat_prompt(tok, p) for p in prompts]
    outs, ended = generate_batch(policy, heads, pc.max_new_tokens, pc.temperature, stop, rng)
    examples = [(h + o + ([tok.special[END]] if e else []), len(h)) for h, o, e in zip(heads, outs, ended)]
    return examples, [tok.decode(o) for o in outs], ended


def ppo_rollout(policy: GPT, ref: GPT, rm: GPT, tok: Tokenizer, prompts, pc: PPOConfig, rng,
                norm=(0.0, 1.0)):
    """Answer each prompt by sampling, then score: per-token rewards are
    -kl_coef (log pi - log pi_ref), and the last token also gets the
    reward model's score, normalised by norm = (mean, std)."""
    examples, texts, ended = sample_answers(policy, tok, prompts, pc, rng)
    x, y, mask = pad_batch(examples, tok.special[END], policy.config.block_size)
    logp, _ = sequence_logprobs(policy, x, y)
    values = head_forward(policy, "value", policy._cache["h"], xp.broadcast_to(
        xp.arange(x.shape[1]), x.shape))
    ref_logp, _ = sequence_logprobs(ref, x, y)
    raw = score_conversations(rm, tok, examples).astype(logp.dtype)
    score = (raw - norm[0]) / norm[1]
    kl = (logp - ref_logp) * mask
    rewards = -pc.kl_coef * kl
    last = (mask.cumsum(1) == mask.sum(1, keepdims=True)) & (mask > 0)  # each row's final token
    rewards = rewards + last * score[:, None]
    adv, ret = gae(rewards, values * mask, mask, pc.gamma, pc.lam)
    n = mask.sum()
    mean = (adv * mask).sum() / n
    std = xp.sqrt((((adv - mean) * mask) ** 2).sum() / n)
    adv = (adv - mean) / (std + 1e-8) * mask                           # whitened
    return dict(x=x, y=y, mask=mask, logp=logp, values=values, adv=adv, ret=ret,
                score=score, raw_score=raw, kl=float(kl.sum() / len(prompts)), texts=texts, ended=ended)


def ppo_loss(policy: GPT, mb: dict, pc: PPOConfig):
    """The clipped surrogate objective plus the clipped value loss."""
    x, y, mask, adv = mb["x"], mb["y"], mb["mask"], mb["adv"]
    n = mask.sum()
    logp, logp_all = sequence_logprobs(policy, x, y)
    h = policy._cache["h"]
    pos = xp.broadcast_to(xp.arange(x.shape[1]), x.shape)
    v = head_forward(policy, "value", h, pos)
    ratio = xp.exp(logp - mb["logp"])
    pg1, pg2 = -adv * ratio, -adv * xp.clip(ratio, 1 - pc.clip, 1 + pc.clip)
    pg_loss = (xp.maximum(pg1, pg2) * mask).sum() / n
    # d/dlogp of max(pg1, pg2): only the unclipped branch depends on logp
    dlogp = xp.where(pg1 >= pg2, -adv * ratio, 0.0) * mask / n
    v_old, ret = mb["values"], mb["ret"]
    v_clip = v_old + xp.clip(v - v_old, -pc.clip, pc.clip)
    vf1, vf2 = (v - ret) ** 2, (v_clip - ret) ** 2
    vf_loss = 0.5 * (xp.maximum(vf1, vf2) * mask).sum() / n
    inside = xp.abs(v - v_old) < pc.clip
    dv = xp.where(vf1 >= vf2, v - ret, (v_clip - ret) * inside) * mask / n * pc.vf_coef
    grads = {}
    dh = head_backward(policy, "value", h, pos, dv, grads)
    dlogits = logprob_backward(logp_all, y, dlogp)
    grads.update(policy.backward(dlogits, dh))
    p = xp.exp(logp_all)
    stats = {"pg_loss": float(pg_loss), "vf_loss": float(vf_loss),
             "clip_frac": float(((xp.abs(ratio - 1) > pc.clip) * mask).sum() / n),
             "entropy": float((-(p * logp_all).sum(-1) * mask).sum() / n)}
    return float(pg_loss + pc.vf_coef * vf_loss), grads, stats


def ppo(policy: GPT, ref: GPT, rm: GPT, tok: Tokenizer, prompts, pc: PPOConfig, log=None) -> list:
    """Proximal policy optimisation: rollout, then several epochs of
    minibatch updates on it, again and again. Returns one dict per rollout."""
    rng = numpy.random.default_rng(pc.seed)
    if "value.weight" not in policy.params:
        add_head(policy, "value")
    opt = AdamW(pc.learning_rate, (0.9, 0.95), weight_decay=0.0)
    history, kl_coef = [], pc.kl_coef
    t0 = time.time()
    # The reward model's scale is arbitrary: normalise its scores so that the
    # starting policy's answers score mean 0 and standard deviation 1.
    calib = [prompts[i] for i in rng.choice(len(prompts), min(len(prompts), 64), replace=False)]
    examples, _, _ = sample_answers(policy, tok, calib, pc, rng)
    s = xp_to_numpy(score_conversations(rm, tok, examples))
    norm = (float(s.mean()), float(s.std()) + 1e-6)
    for it in range(pc.iters):
        batch = [prompts[i] for i in rng.choice(len(prompts), pc.prompts_per_iter, replace=False)]
        ro = ppo_rollout(policy, ref, rm, tok, batch, PPOConfig(**{**asdict(pc), "kl_coef": kl_coef}),
                         rng, norm)
        stats = []
        for _ in range(pc.epochs):
            order = rng.permutation(len(batch))
            for part in numpy.array_split(order, pc.minibatches):
                part = xp.asarray(part)
                mb = {k: ro[k][part] for k in ("x", "y", "mask", "logp", "values", "adv", "ret")}
                loss, grads, s = ppo_loss(policy, mb, pc)
                clip_grad_norm(grads, 1.0)
                opt.step(policy.params, grads)
                stats.append(s)
        row = {"iter": it + 1, "reward": float(ro["raw_score"].mean()), "kl": ro["kl"],
               "kl_coef": kl_coef, **{k: float(numpy.mean([s[k] for s in stats])) for k in stats[0]}}
        history.append(row)
        if pc.target_kl:                 # adaptive KL controller (Ziegler et al., 2019)
            kl_coef *= 1 + numpy.clip(ro["kl"] / pc.target_kl - 1, -0.2, 0.2) * 0.1
        if log:
            log(row, time.time() - t0)
    return history


def kl_to_reference(policy: GPT, ref: GPT, x, y, mask):
    """KL(policy || reference) of the next-token distributions, summed over
    each row's answer positions -> (B,): how far RLHF moved the model."""
    _, lp = sequence_logprobs(policy, x, y)
    _, lq = sequence_logprobs(ref, x, y)
    return ((xp.exp(lp) * (lp - lq)).sum(-1) * mask).sum(1)

# ---- DPO -------------------------------------------------------------------
# The policy's own log-probability ratio to the reference acts as an implicit
# reward; the Bradley-Terry loss on it trains the policy directly:
#   loss = -log sigmoid(beta [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))])

def answer_logprob(model: GPT, x, y, mask):
    """Sum of log-probabilities of each row's answer tokens -> (B,)."""
    logp, logp_all = sequence_logprobs(model, x, y)
    return (logp * mask).sum(1), logp_all


def dpo_loss(policy: GPT, ref: GPT, batch, beta: float):
    """batch = pad_batch(pair_examples(...)): chosen rows first."""
    x, y, mask = batch
    ref_lp, _ = answer_logprob(ref, x, y, mask)
    lp, logp_all = answer_logprob(policy, x, y, mask)
    n = len(lp) // 2
    z = beta * ((lp[:n] - ref_lp[:n]) - (lp[n:] - ref_lp[n:]))
    loss = float(xp.logaddexp(0.0, -z).mean())
    dz = -1.0 / (1.0 + xp.exp(z)) / n
    drow = beta * xp.concatenate([dz, -dz])                          # d loss / d lp per row
    dlogits = logprob_backward(logp_all, y, drow[:, None] * mask)
    return loss, policy.backward(dlogits)


# =============================================================================
# 8. Task fine-tuning: LoRA
# =============================================================================
# Fine-tuning every weight for one task is costly and can erase what the
# model knew. LoRA freezes the model and learns a low-rank correction for
# chosen matrices: W x becomes W x + (alpha/r) B(A x), with A (in, r) and
# B (r, out), r small. B starts at zero, so training starts exactly at the
# base model; only A and B (a few percent of the parameters) are trained.

def add_lora(model: GPT, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
             r: int = 8, alpha: float = 16.0, dropout: float = 0.0, seed: int = 0) -> list:
    """Attach LoRA adapters to every linear layer whose name ends with one of
    `targets`, freeze all other parameters, and return the trainable names."""
    rng = numpy.random.default_rng(seed)
    names = [n[:-len(".weight")] for n in model.params
             if n.endswith(".weight") and n.startswith("h.") and n[:-len(".weight")].endswith(tuple(targets))]
    if not names:
        raise ValueError(f"targets: no linear layer matches {targets!r}")
    for name in names:
        k, n = model.params[name + ".weight"].shape
        dtype = model.params[name + ".weight"].dtype
        model.params[name + ".lora_A"] = xp.asarray(rng.normal(0, 1 / math.sqrt(k), (k, r))).astype(dtype)
        model.params[name + ".lora_B"] = xp.zeros((r, n), dtype)
        model.lora[name] = {"scale": alpha / r, "dropout": dropout, "r": r, "alpha": alpha}
    trainable = [n for n in model.params if ".lora_" in n]
    model.frozen = set(model.params) - set(trainable)
    return trainable


def lora_forward(model, name, x, caches):
    """The adapter's share of the layer's output: scale * (x A) B, itself two
    linear layers without bias."""
    a, b = model.params[name + ".lora_A"], model.params[name + ".lora_B"]
    xd, mask = dropout_forward(x, model.lora[name]["dropout"], model.rng)
    xa = linear_forward(xd, a, None)                                  # (M, r)
    caches.append((xd, mask, xa))
    return linear_forward(xa, b, None) * model.lora[name]["scale"]


def lora_backward(model, name, dy, caches, grads):
    xd, mask, xa = caches.pop()
    a, b = model.params[name + ".lora_A"], model.params[name + ".lora_B"]
    dxa, grads[name + ".lora_B"], _ = linear_backward(dy * model.lora[name]["scale"], xa, b)
    dxd, grads[name + ".lora_A"], _ = linear_backward(dxa, xd, a)
    return dropout_backward(dxd, mask)


def merge_lora(model: GPT):
    """Fold every adapter into its weight (W += scale A B): inference then
    costs nothing extra. unmerge_lora() undoes it."""
    for name, s in list(model.lora.items()):
        model.params[name + ".weight"] += s["scale"] * (model.params[name + ".lora_A"] @ model.params[name + ".lora_B"])
        model.merged_lora[name] = model.lora.pop(name)


def unmerge_lora(model: GPT):
    for name, s in model.merged_lora.items():
        model.params[name + ".weight"] -= s["scale"] * (model.params[name + ".lora_A"] @ model.params[name + ".lora_B"])
        model.lora[name] = s
    model.merged_lora = {}


def finetune(model: GPT, tok: Tokenizer, records, tc: TrainConfig, lora: dict = None, log=None,
             replay=None, replay_fraction=0.0):
    """Task fine-tuning on conversations, the instruction-tuning loss (and
    its replay of pretraining text), with LoRA adapters (lora = add_lora's
    keyword arguments) or, with lora=None, every weight. -> TrainState."""
    if lora is not None:
        add_lora(model, **lora)
    state = TrainState()
    batches = sft_batches(tok, records, tc.batch_size, model.config.block_size, replay, replay_fraction)
    train_steps(model, state, tc, batches, log=log)
    return state


def trainable_fraction(model: GPT) -> float:
    """The share of the model's parameters that fine-tuning changes."""
    base = sum(v.size for k, v in model.params.items() if ".lora_" not in k and k in param_shapes(model.config))
    train = sum(v.size for k, v in model.params.items() if k not in model.frozen and ".lora_" in k)
    return train / base if model.lora else 1.0


def save_lora(path: str, model: GPT):
    """The adapter alone: A and B of every adapted layer, a few percent of
    the model, applied later to the same base model with load_lora()."""
    save_safetensors(path, {k: v for k, v in model.params.items() if ".lora_" in k},
                     {"format": "llm-lora-v1", "lora": json.dumps({**model.lora, **model.merged_lora})})


def load_lora(path: str, model: GPT):
    tensors, meta = load_safetensors(path)
    if meta.get("format") != "llm-lora-v1":
        raise ValueError(f"{path}: not an llm LoRA adapter (metadata format {meta.get('format')!r})")
    for k, v in tensors.items():
        base = k.rsplit(".lora_", 1)[0] + ".weight"
        if base not in model.params:
            raise ValueError(f"{path}: adapter tensor {k!r} has no weight {base!r} in the model")
    model.params.update(tensors)
    model.lora = json.loads(meta["lora"])
    model.frozen = {n for n in model.params if ".lora_" not in n}


# =============================================================================
# 9. Checkpoints: safetensors, written with NumPy
# =============================================================================
# The safetensors format: an 8-byte little-endian header length, a JSON
# header giving each tensor's dtype, shape and byte range, then the raw
# bytes. No pickle: loading a file never runs code. Files are written to a
# temporary name and renamed, so a crash never leaves half a checkpoint.

_ST_DTYPES = {"F64": numpy.float64, "F32": numpy.float32, "F16": numpy.float16,
              "I64": numpy.int64, "I32": numpy.int32, "U8": numpy.uint8, "BF16": None}


def _atomic_write(path: str, data: bytes):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors(path: str, tensors: dict, metadata: dict = None):
    header, offset, blobs = {}, 0, []
    names = {numpy.dtype(v): k for k, v in _ST_DTYPES.items() if v is not None}
    for name, arr in tensors.items():
        arr = numpy.ascontiguousarray(xp_to_numpy(arr))
        if arr.dtype not in names:
            raise TypeError(f"tensors[{name!r}]: unsupported dtype {arr.dtype}")
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                  # align the data to 8 bytes
    _atomic_write(path, struct.pack("<Q", len(head)) + head + b"".join(blobs))


def load_safetensors(path: str):
    """-> (tensors, metadata). A missing, truncated or foreign file is a
    ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"{path}: not a safetensors file, or truncated (header of {n} bytes,"
                         f" file of {len(raw)})")
    try:
        header = json.loads(raw[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from None
    meta = header.pop("__metadata__", {}) or {}
    data, tensors = raw[8 + n:], {}
    for name, t in header.items():
        try:
            dtype = _ST_DTYPES[t["dtype"]]
            begin, end = t["data_offsets"]
            shape = tuple(int(s) for s in t["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {t!r}") from None
        bf16 = dtype is None                        # NumPy has no bfloat16: read the 16-bit words
        dtype = numpy.uint16 if bf16 else dtype
        count = math.prod(shape)
        if not 0 <= begin <= end <= len(data) or end - begin != count * numpy.dtype(dtype).itemsize:
            raise ValueError(f"{path}: truncated or corrupt (tensor {name!r} wants bytes"
                             f" {begin}..{end} of {len(data)})")
        arr = numpy.frombuffer(data, dtype=numpy.dtype(dtype).newbyteorder("<"),
                               count=count, offset=begin).reshape(shape).astype(dtype)
        tensors[name] = xp.asarray(bf16_to_float32(arr) if bf16 else arr)
    return tensors, meta


def bf16_to_float32(words):
    """bfloat16 is the top 16 bits of a float32 (same sign and exponent, a
    shorter mantissa): shifting the words back up gives the float32 exactly."""
    return (numpy.asarray(words, numpy.uint16).astype(numpy.uint32) << 16).view(numpy.float32)


def xp_to_numpy(a):
    """Arrays leave the array module here (CuPy arrays have .get())."""
    return a.get() if hasattr(a, "get") else numpy.asarray(a)


def save_checkpoint(path: str, model: GPT, tokenizer: Tokenizer, state: TrainState = None, **info):
    """Weights, config, tokenizer, optimizer state, step and RNG state in one
    file. `info` adds JSON-able metadata (the stage, training settings...)."""
    tensors = dict(model.params)
    meta = {"format": "llm-checkpoint-v1", "config": json.dumps(asdict(model.config)),
            "tokenizer": tokenizer.to_json(), "lora": json.dumps(model.lora),
            "info": json.dumps(info)}
    if state is not None:
        for name in state.opt.m if state.opt else ():
            tensors["optimizer.m." + name] = state.opt.m[name]
            tensors["optimizer.v." + name] = state.opt.v[name]
        opt = ({k: getattr(state.opt, k) for k in ("lr", "betas", "eps", "weight_decay", "t")}
               if state.opt else None)                # (asdict would deep-copy m and v)
        meta["state"] = json.dumps({"step": state.step, "opt": opt, "rng_state": state.rng_state,
                                    "history": state.history})
    save_safetensors(path, tensors, meta)


def load_checkpoint(path: str):
    """-> (model, tokenizer, state, info)."""
    tensors, meta = load_safetensors(path)
    if meta.get("format") != "llm-checkpoint-v1":
        raise ValueError(f"{path}: a safetensors file, but not an llm checkpoint"
                         f" (metadata format {meta.get('format')!r})")
    try:
        config = GPTConfig(**json.loads(meta["config"]))
        tokenizer = Tokenizer.from_json(meta["tokenizer"], path)
        lora = json.loads(meta.get("lora", "{}"))
        info = json.loads(meta.get("info", "{}"))
        s = json.loads(meta["state"]) if "state" in meta else None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({e})") from None
    params = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    missing = set(param_shapes(config)) - set(params)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensors {sorted(missing)[:5]}")
    model = GPT(config, params)
    model.lora = lora
    if lora:
        model.frozen = {n for n in params if ".lora_" not in n}
    state = None
    if s is not None:
        opt = None
        if s["opt"] is not None:
            opt = AdamW(**{**s["opt"], "betas": tuple(s["opt"]["betas"])})
            for k, v in tensors.items():
                if k.startswith("optimizer.m."):
                    opt.m[k[12:]] = v
                elif k.startswith("optimizer.v."):
                    opt.v[k[12:]] = v
        state = TrainState(s["step"], opt, s["rng_state"], [tuple(h) for h in s["history"]])
    return model, tokenizer, state, info


# ---- real GPT-2: Hugging Face's checkpoint layout ----------------------------
# OpenAI's GPT-2 weights are published in Hugging Face's safetensors layout:
# the same parameter names as ours, under a `transformer.` prefix, with
# Conv1D weights stored (in, out) as ours are, plus an `lm_head.weight` that
# is the token embedding again (tied) and per-layer `attn.bias` buffers (the
# causal mask, not a parameter). So loading GPT-2 is renaming, nothing more.

_HF_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def find_tiktoken(folder: str):
    """The .tiktoken vocabulary in a folder (gpt2.tiktoken first), or None."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".tiktoken"))
    except OSError:
        return None
    if not names:
        return None
    return os.path.join(folder, "gpt2.tiktoken" if "gpt2.tiktoken" in names else names[0])


def load_gpt2(path_or_dir: str, n_head: int = None):
    """A GPT-2 checkpoint in Hugging Face's layout (a model.safetensors file,
    or the folder holding it) -> (model, tokenizer). The config comes from
    the shapes (n_layer: the number of h.N blocks; n_embd and vocab_size:
    wte; block_size: wpe); n_head from the argument, else config.json beside
    the file, else n_embd / 64 (GPT-2's head width: 12 heads for 768 wide).
    F16 and BF16 weights become float32. The tokenizer is the folder's
    .tiktoken file, or None when there is none."""
    path = os.path.join(path_or_dir, "model.safetensors") if os.path.isdir(path_or_dir) else path_or_dir
    folder = os.path.dirname(os.path.abspath(path))
    tensors, _ = load_safetensors(path)
    params = {}
    for name, value in tensors.items():
        name = name[len("transformer."):] if name.startswith("transformer.") else name
        if not _HF_BUFFER.search(name):
            params[name] = value
    if "wte.weight" not in params or "wpe.weight" not in params:
        raise ValueError(f"{path}: not a GPT-2 checkpoint (no wte.weight/wpe.weight tensors)")
    head = params.pop("lm_head.weight", None)
    if head is not None and not (head.shape == params["wte.weight"].shape
                                 and xp.array_equal(head, params["wte.weight"])):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; llm ties them")
    if n_head is None and os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            n_head = json.load(f).get("n_head")
    (V, C), T = params["wte.weight"].shape, params["wpe.weight"].shape[0]
    if n_head is None:
        if C % 64:
            raise ValueError(f"{path}: cannot infer n_head for n_embd={C}; pass n_head"
                             " or put a config.json with n_head beside the file")
        n_head = C // 64
    n_layer = len({name.split(".")[1] for name in params if name.startswith("h.")})
    cfg = GPTConfig(n_layer=n_layer, n_head=int(n_head), n_embd=C, block_size=T, vocab_size=V)
    shapes = param_shapes(cfg)
    missing, extra = set(shapes) - set(params), set(params) - set(shapes)
    if missing or extra:
        raise ValueError(f"{path}: not the GPT-2 layout (missing {sorted(missing)[:5]},"
                         f" unexpected {sorted(extra)[:5]})")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(params[name].shape)},"
                             f" expected {shape}")
        params[name] = params[name].astype(xp.float32)
    vocab = find_tiktoken(folder)
    return GPT(cfg, params), Tokenizer.from_tiktoken(vocab) if vocab else None


def export_gpt2(model: GPT, path: str, tokenizer: Tokenizer = None):
    """Write the model in Hugging Face's GPT-2 layout: `path` (a .safetensors
    file, or a folder that gets model.safetensors) with `transformer.`-named
    float32 weights and the tied lm_head.weight, and config.json beside it.
    With a tokenizer, also its vocabulary as tokenizer.tiktoken (ranks only;
    the special tokens follow the ranks, which is how llm numbers them)."""
    if model.lora:
        raise ValueError("model: has unmerged LoRA adapters; call merge_lora(model) first")
    cfg = model.config
    if not path.endswith(".safetensors"):
        path = os.path.join(path, "model.safetensors")
    folder = os.path.dirname(os.path.abspath(path))
    tensors = {"transformer." + name: model.params[name].astype(xp.float32)
               for name in param_shapes(cfg)}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    save_safetensors(path, tensors, {"format": "pt"})
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
              "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
              "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}
    _atomic_write(os.path.join(folder, "config.json"), json.dumps(config, indent=2).encode())
    if tokenizer is not None:
        lines = [base64.b64encode(b).decode() + f" {i}\n" for b, i in sorted(tokenizer.ranks.items(),
                                                                          key=lambda kv: kv[1])]
        _atomic_write(os.path.join(folder, "tokenizer.tiktoken"), "".join(lines).encode())


# =============================================================================
# 10. The fast kernels: fastops (C on the CPU, CUDA on the GPU)
# =============================================================================
# Everything above is complete in NumPy. Two operations take most of the
# time, the linear layers' matrix products and attention, so linear_forward,
# linear_backward, attention_forward and attention_backward hand float32
# arrays to the C kernels of fastops.c when they are built; so do gelu_* and
# layernorm_* (fused element-wise and per-row kernels). This section
# loads them and checks every array before a pointer crosses into C.

# ---- the C kernels, when built ---------------------------------------
# fastops.c (build it with `python build_ext.py`) computes the functions
# below in C with SIMD and threads. It is used for float32 arrays only: float64
# (the gradient checks) and attention with dropout stay on the NumPy code, which
# is also the reference the C kernels are tested against. LLM_NUMPY=1 forces
# NumPy everywhere. The wrappers check every array before a pointer goes to C.

# OpenMP's idle threads sleep at once instead of spinning (OMP_WAIT_POLICY,
# read by libgomp when fastops loads it, so it is set before; a value in the
# environment wins). On a machine whose cores are shared with other busy
# processes, a spinning thread holds a core while the thread it waits for
# has been preempted, and every barrier can cost a scheduler tick: measured
# here with other jobs running, the small benchmark model's training step took
# 0.33-0.45 s passive against 0.82-1.06 s spinning (bench.py prints the policy).
_OMP_ENV = {"OMP_WAIT_POLICY": "passive"}
_OMP_SET_HERE = []                                     # the ones llm.py set (not the user)


def _load_fastops():
    if os.environ.get("LLM_NUMPY") == "1":
        return None
    for k, val in _OMP_ENV.items():
        if k not in os.environ:
            os.environ[k] = val
            _OMP_SET_HERE.append(k)
    import glob, importlib.util, warnings
    here = os.path.dirname(os.path.abspath(__file__))
    for path in glob.glob(os.path.join(here, "_fastops*.so")) + glob.glob(os.path.join(here, "_fastops*.pyd")):
        try:
            spec = importlib.util.spec_from_file_location("_fastops", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        except ImportError:
            continue                                   # built for another Python
    warnings.warn("fastops (the C kernels) is not built: using the slower NumPy code. "
                  "Build it with `python build_ext.py` (or set LLM_NUMPY=1 to silence this).")
    return None


_fastops = _load_fastops()
_use_fastops = _fastops is not None


# ---- the GPU: CuPy arrays and fastops.c's CUDA section -------------------------
# use_device("cuda") makes `xp` CuPy (an optional dependency, imported only
# here), so every array -- parameters, activations, gradients, optimizer state
# -- lives on the GPU, and the same code below runs there. The heavy math then
# goes to _fastops_cuda.so (`python build_ext.py --cuda`), opened with cffi's
# ABI mode; its functions take device pointers. Without it CuPy's own math runs.
_cuda = None                                           # (ffi, lib) once loaded


def _load_cuda():
    import cffi, types, warnings
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fastops_cuda.so")
    if os.environ.get("LLM_NUMPY") == "1" or not os.path.exists(path):
        warnings.warn("fastops' CUDA kernels are not built: using CuPy's own math. "
                      "Build them with `python build_ext.py --cuda`.")
        return None
    import importlib.util                  # build_ext.py reads the API from fastops.c
    spec = importlib.util.spec_from_file_location("build_ext", os.path.join(os.path.dirname(path), "build_ext.py"))
    build_ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_ext)
    ffi = cffi.FFI()
    ffi.cdef(build_ext.CUDA_CDEF)
    lib = ffi.dlopen(path)
    msg = lib.fo_cuda_sync()            # its CUDA runtime starts (or the driver is too old)
    if msg != ffi.NULL:
        warnings.warn(f"fastops' CUDA kernels cannot run here ({ffi.string(msg).decode()}): "
                      "using CuPy's own math. Rebuild them with this machine's nvcc.")
        return None
    return types.SimpleNamespace(ffi=ffi, lib=lib)


def use_device(name: str):
    """'cpu' (NumPy, the C kernels) or 'cuda' (CuPy, the CUDA kernels). Call
    it before building a model: arrays made earlier stay where they are."""
    global xp, _use_fastops, _cuda
    if name == "cpu":
        xp, _use_fastops = numpy, _fastops is not None
    elif name == "cuda":
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("no GPU")
        except Exception as e:
            raise RuntimeError(f"device cuda: needs CuPy and a CUDA GPU ({type(e).__name__}: {e}); "
                               "install CuPy with e.g. `pip install cupy-cuda12x`") from None
        xp, _cuda = cupy, _cuda or _load_cuda()
        _use_fastops = _cuda is not None
    else:
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {name!r}")


def _kernels():
    """(lib, ffi) of the kernels for the arrays of the current device."""
    m = _fastops if xp is numpy else _cuda
    return m.lib, m.ffi


def _done(*out):
    """After a kernel call: raise its error, if any (a CUDA launch error; on
    the CPU, scratch memory that could not be allocated)."""
    if xp is not numpy:
        msg = _cuda.lib.fo_cuda_error()
        if msg != _cuda.ffi.NULL:
            raise RuntimeError("fastops CUDA: " + _cuda.ffi.string(msg).decode())
    elif _fastops.lib.fo_out_of_memory():
        raise MemoryError("fastops: out of memory for a kernel's scratch buffers")
    return out[0] if len(out) == 1 else out


def set_backend(name: str) -> str:
    """Choose 'fastops' or 'numpy' for the heavy math; returns the previous one."""
    global _use_fastops
    if name not in ("fastops", "numpy"):
        raise ValueError(f"backend: expected 'fastops' or 'numpy', got {name!r}")
    if name == "fastops" and (_fastops if xp is numpy else _cuda) is None:
        raise RuntimeError("backend: fastops is not built (run `python build_ext.py`"
                           + ("" if xp is numpy else " --cuda") + ")")
    previous, _use_fastops = ("fastops" if _use_fastops else "numpy"), name == "fastops"
    return previous


def _fast(*arrays) -> bool:
    return _use_fastops and all(
        isinstance(a, xp.ndarray) and a.dtype == numpy.float32 for a in arrays)


def _f32(name, a, ndim, allow_transposed=False):
    """A float32 array of `ndim` dims, C-contiguous (copied if not; a 2-D
    Fortran-ordered array, i.e. a transposed view, passes as is if allowed)."""
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name}: expected a {xp.__name__} array, got {type(a).__name__}")
    if a.dtype != numpy.float32:
        raise TypeError(f"{name}: expected dtype float32, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if allow_transposed and a.flags.f_contiguous and not a.flags.c_contiguous:
        return a
    return xp.ascontiguousarray(a)


def _ptr(a):
    if xp is not numpy:                                # a GPU array: its device address
        return _cuda.ffi.cast("float *", int(a.data.ptr))
    # a Fortran-ordered matrix is the C-ordered transpose: same memory
    return _fastops.ffi.cast("float *", _fastops.ffi.from_buffer(a if a.flags.c_contiguous else a.T))


def _strides(a):
    """(row stride, column stride) in elements of a C- or F-contiguous matrix."""
    return (a.shape[1], 1) if a.flags.c_contiguous else (1, a.shape[0])


def fo_linear_forward(x, w, b):
    x, w = _f32("x", x, 2), _f32("w", w, 2, allow_transposed=True)
    (M, K), N = x.shape, w.shape[1]
    if w.shape[0] != K:
        raise ValueError(f"w: expected shape ({K}, N) to match x {x.shape}, got {w.shape}")
    if b is not None:
        b = _f32("b", b, 1)
        if b.shape != (N,):
            raise ValueError(f"b: expected shape ({N},), got {b.shape}")
    y = xp.empty((M, N), numpy.float32)
    rs, cs = _strides(w)
    lib, ffi = _kernels()
    lib.fo_sgemm(M, N, K, _ptr(x), K, 1, _ptr(w), rs, cs, _ptr(y), N, 0,
                 ffi.NULL if b is None else _ptr(b))
    return _done(y)


def fo_linear_backward(dy, x, w):
    dy, x, w = _f32("dy", dy, 2), _f32("x", x, 2), _f32("w", w, 2, allow_transposed=True)
    (M, K), N = x.shape, w.shape[1]
    if w.shape[0] != K:
        raise ValueError(f"w: expected shape ({K}, N) to match x {x.shape}, got {w.shape}")
    if dy.shape != (M, N):
        raise ValueError(f"dy: expected shape {(M, N)}, got {dy.shape}")
    dx, dw, db = (xp.empty(s, numpy.float32) for s in ((M, K), (K, N), (N,)))
    rs, cs = _strides(w)
    lib, ffi = _kernels()
    lib.fo_sgemm(M, K, N, _ptr(dy), N, 1, _ptr(w), cs, rs, _ptr(dx), K, 0, ffi.NULL)
    lib.fo_sgemm(K, N, M, _ptr(x), 1, K, _ptr(dy), N, 1, _ptr(dw), N, 0, ffi.NULL)
    lib.fo_colsum(_ptr(dy), _ptr(db), M, N)
    return _done(dx, dw, db)


def fo_linear_backward_input(dy, w):
    dy, w = _f32("dy", dy, 2), _f32("w", w, 2, allow_transposed=True)
    (M, N), K = dy.shape, w.shape[0]
    if w.shape[1] != N:
        raise ValueError(f"w: expected shape (K, {N}) to match dy {dy.shape}, got {w.shape}")
    dx = xp.empty((M, K), numpy.float32)
    rs, cs = _strides(w)
    lib, ffi = _kernels()
    lib.fo_sgemm(M, K, N, _ptr(dy), N, 1, _ptr(w), cs, rs, _ptr(dx), K, 0, ffi.NULL)
    return _done(dx)


def fo_attention_forward(q, k, v):
    q, k, v = _f32("q", q, 4), _f32("k", k, 4), _f32("v", v, 4)
    for name, a in (("k", k), ("v", v)):
        if a.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {q.shape}, got {a.shape}")
    B, H, T, D = q.shape
    y, lse = xp.empty_like(q), xp.empty((B, H, T), numpy.float32)
    _kernels()[0].fo_attention_forward(_ptr(q), _ptr(k), _ptr(v), _ptr(y), _ptr(lse), B, H, T, D)
    return _done(y), {"fastops": (q, k, v, y, lse)}


def fo_attention_backward(dy, cache):
    q, k, v, y, lse = cache["fastops"]
    dy = _f32("dy", dy, 4)
    if dy.shape != q.shape:
        raise ValueError(f"dy: expected shape {q.shape}, got {dy.shape}")
    dq, dk, dv = xp.empty_like(q), xp.empty_like(q), xp.empty_like(q)
    _kernels()[0].fo_attention_backward(_ptr(dy), _ptr(q), _ptr(k), _ptr(v), _ptr(y), _ptr(lse),
                                        _ptr(dq), _ptr(dk), _ptr(dv), *q.shape)
    return _done(dq, dk, dv)


# GELU and LayerNorm: one pass each over the data. Their caches are dicts, as
# attention's.

def fo_gelu_forward(x):
    x = _f32("x", x, getattr(x, "ndim", 0))
    y = xp.empty_like(x)
    _kernels()[0].fo_gelu_forward(_ptr(x), _ptr(y), x.size)
    return _done(y), {"fastops": x}


def fo_gelu_backward(dy, cache):
    x = cache["fastops"]
    dy = _f32("dy", dy, x.ndim)
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected shape {x.shape}, got {dy.shape}")
    dx = xp.empty_like(x)
    _kernels()[0].fo_gelu_backward(_ptr(dy), _ptr(x), _ptr(dx), x.size)
    return _done(dx)


def fo_layernorm_forward(x, w, b, eps=1e-5):
    x = _f32("x", x, getattr(x, "ndim", 0))
    C = x.shape[-1] if x.ndim else 0
    w, b = _f32("w", w, 1), _f32("b", b, 1)
    if x.ndim < 1 or C < 1 or w.shape != (C,) or b.shape != (C,):
        raise ValueError(f"layernorm: expected x (..., C) with C >= 1 and w, b ({C},), "
                         f"got {x.shape}, {w.shape}, {b.shape}")
    M = x.size // C
    y = xp.empty_like(x)
    mean, rstd = xp.empty(M, numpy.float32), xp.empty(M, numpy.float32)
    _kernels()[0].fo_layernorm_forward(_ptr(x), _ptr(w), _ptr(b), _ptr(y), _ptr(mean),
                                       _ptr(rstd), M, C, float(eps))
    return _done(y), {"fastops": (x, w, mean, rstd)}


def fo_layernorm_backward(dy, cache):
    x, w, mean, rstd = cache["fastops"]
    dy = _f32("dy", dy, x.ndim)
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected shape {x.shape}, got {dy.shape}")
    C = x.shape[-1]
    M = x.size // C
    dx, dw, db = xp.empty_like(x), xp.empty(C, numpy.float32), xp.empty(C, numpy.float32)
    _kernels()[0].fo_layernorm_backward(_ptr(dy), _ptr(x), _ptr(w), _ptr(mean), _ptr(rstd),
                                        _ptr(dx), _ptr(dw), _ptr(db), M, C)
    return _done(dx, dw, db)


# The optimizer in C: the global gradient norm (for clipping) and the AdamW
# update of every parameter, each one multi-threaded pass over all arrays,
# the clipping factor applied on the fly (gscale) instead of a pass that
# scales the gradients. On the CPU only; they update p, m, v in place, so
# these must be float32, C-contiguous and of the parameter's shape (no copies).

def _f32_inplace(name, a, shape=None):
    if not isinstance(a, numpy.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != numpy.float32:
        raise TypeError(f"{name}: expected dtype float32, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (updated in place)")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    return a


def _ptr_array(arrays):
    ffi = _fastops.ffi
    keep = [ffi.from_buffer(a) for a in arrays]
    return ffi.new("float *[]", [ffi.cast("float *", k) for k in keep]), keep


def fo_grad_sumsq(grads) -> float:
    """Sum of squares of every array in `grads` (a dict or a list), in float64."""
    items = grads.items() if isinstance(grads, dict) else enumerate(grads)
    arrays = [_f32("grads[%r]" % (k,), g, getattr(g, "ndim", 0)) for k, g in items]
    if xp is not numpy or not arrays:
        return float(sum(float((a.astype(numpy.float64) ** 2).sum()) for a in arrays))
    ptrs, keep = _ptr_array(arrays)
    sizes = _fastops.ffi.new("long[]", [a.size for a in arrays])
    return _done(_fastops.lib.fo_sumsq(len(arrays), ptrs, sizes))


def fo_adamw_step(params, grads, m, v, decay, lr, betas, eps, weight_decay, t, gscale=1.0):
    """One AdamW step (llm.AdamW.step's arithmetic) for every name in `grads`:
    params[name], m[name], v[name] updated in place; decay[name] true for the
    arrays that are weight-decayed; t the step count after this step (for the
    bias corrections); every gradient multiplied by gscale (clipping) first."""
    names = list(grads)
    ps, gs, ms, vs = [], [], [], []
    for k in names:
        p = _f32_inplace(f"params[{k!r}]", params[k])
        g = _f32(f"grads[{k!r}]", grads[k], p.ndim)
        if g.size != p.size or numpy.shape(grads[k]) != p.shape:
            raise ValueError(f"grads[{k!r}]: expected shape {p.shape}, got {numpy.shape(grads[k])}")
        ps.append(p)
        gs.append(g)
        ms.append(_f32_inplace(f"m[{k!r}]", m[k], p.shape))
        vs.append(_f32_inplace(f"v[{k!r}]", v[k], p.shape))
    if not names:
        return
    ffi, lib = _fastops.ffi, _fastops.lib
    (pp, k1), (gp, k2), (mp, k3), (vp, k4) = (_ptr_array(a) for a in (ps, gs, ms, vs))
    b1, b2 = betas
    lib.fo_adamw(len(names), pp, gp, mp, vp, ffi.new("long[]", [p.size for p in ps]),
                 ffi.new("int[]", [1 if decay[k] else 0 for k in names]), float(lr), float(b1),
                 float(b2), float(eps), float(weight_decay), float(1.0 - b1 ** t),
                 float(1.0 - b2 ** t), float(gscale))
    _done()


# Softmax with cross-entropy in one pass (CPU): per-row losses and the
# gradient of sum(weights * loss) * dscale with respect to the logits.

def fo_cross_entropy(logits, targets, weights=None, dscale=1.0):
    """logits (M, V), targets (M,) integer ids, weights (M,) or None ->
    (loss (M,), dlogits (M, V)), loss[r] = -log softmax(logits[r])[targets[r]],
    dlogits[r] = (softmax(logits[r]) - onehot(targets[r])) * weights[r] * dscale."""
    logits = _f32("logits", logits, 2)
    M, V = logits.shape
    t = numpy.asarray(targets)
    if t.shape != (M,) or t.dtype.kind not in "iu":
        raise ValueError(f"targets: expected ({M},) integer ids, got shape {t.shape} dtype {t.dtype}")
    if M and (int(t.min()) < 0 or int(t.max()) >= V):
        raise ValueError(f"targets: ids must be in 0..{V - 1}, got {int(t.min())}..{int(t.max())}")
    t = numpy.ascontiguousarray(t, dtype=numpy.int64)
    if weights is not None:
        weights = _f32("weights", weights, 1)
        if weights.shape != (M,):
            raise ValueError(f"weights: expected shape ({M},), got {weights.shape}")
    loss, dlogits = numpy.empty(M, numpy.float32), numpy.empty((M, V), numpy.float32)
    ffi, lib = _fastops.ffi, _fastops.lib
    lib.fo_cross_entropy(_ptr(logits), ffi.cast("int64_t *", ffi.from_buffer(t)),
                         ffi.NULL if weights is None else _ptr(weights), _ptr(loss),
                         _ptr(dlogits), float(dscale), M, V)
    return _done(loss, dlogits)
