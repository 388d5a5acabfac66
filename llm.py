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
 10. Fast kernels   fastops.c's C (and CUDA) kernels for the heavy math;
                    several processes training together (MPI)

Sections 1 to 9 are the whole model in NumPy. Section 10 puts faster
versions of the same layers in their place when they are built (fastops.c's
C kernels on the CPU, its CUDA kernels on a GPU); nothing above it changes.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import heapq
import json
import math
import numbers
import os
import re
import struct
import time
import types
from dataclasses import asdict, dataclass, field

import numpy

# The array module. Every array is made through `xp`, so that another module
# with NumPy's API (CuPy, on a GPU) can take its place (section 10). `world`
# is the processes that train together: this one alone, unless mpirun started
# several (section 10); only its rank 0 writes files (atomic_write).
xp = numpy


def to_numpy(a):
    """An array as a NumPy array, wherever it lives (CuPy's have .get())."""
    return a.get() if hasattr(a, "get") else numpy.asarray(a)


def is_number(v) -> bool:
    """A finite int or float, as JSON gives them (not a bool: True is 1 to Python)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_count(v, least=1) -> bool:
    """An integer >= least, Python's or NumPy's (not a bool)."""
    return isinstance(v, (int, numpy.integer)) and not isinstance(v, bool) and v >= least


def is_real(v) -> bool:
    """A number, Python's or NumPy's, infinite too (not a bool); a NaN fails any comparison after."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def warn(message: str):
    """A UserWarning of one line (warnings' filters still apply)."""
    import warnings
    warnings.warn_explicit(message, UserWarning, "llm.py", 0)


def atomic_write(path: str, data: bytes):
    """Write a file whole or not at all: to a temporary name, then renamed,
    so a crash never leaves half a file (checkpoints, tokenizers, reports).
    With several processes, rank 0 alone writes (section 10)."""
    import glob
    if world.rank != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):     # left by a writer that was killed
        os.remove(stale)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):                       # the write or the rename failed
            os.remove(tmp)
    with contextlib.suppress(OSError):                # the rename on disk too (Windows cannot open a folder)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


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
        check_vocabulary(ranks, special, pattern)     # (every tokenizer, trained or read from a file)
        self._split = re.compile(pattern)
        self.ranks = ranks
        self.special = special                        # "<|end|>" -> id
        self.pattern = pattern
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
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        pieces = [bytes([i]) for i in range(256)]
        while len(pieces) < 256 + n_merges and heap:
            negc, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -negc or negc == 0:
                continue
            new, changed = len(pieces), set()
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
                changed.update(zip(word, word[1:]), zip(merged, merged[1:]))
            pair_count.pop(pair, None)
            for p in changed - {pair}:                # each changed count anew: the old entry is stale
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
        ranks = {b: i for i, b in enumerate(pieces)}
        special = {s: len(pieces) + i for i, s in enumerate(special)}
        return cls(ranks, special)

    # ---- encoding and decoding ---------------------------------------------
    def _bpe(self, chunk: bytes) -> list:
        """Merge the chunk's bytes, lowest-ranked adjacent pair first (ties:
        the leftmost). The pairs wait in a heap, each merge pushes the two it
        makes: a long unbroken word costs n log n, not n^2 rescans."""
        ids = self._cache.get(chunk)
        if ids is not None:
            return ids
        ranks, n = self.ranks, len(chunk)
        parts = [chunk[i:i + 1] for i in range(n)]       # parts[i]: the token starting at byte i, b"" inside one
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))       # the neighbouring tokens' starts
        heap = [(ranks[p], i) for i in range(n - 1) if (p := chunk[i:i + 2]) in ranks]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            if not parts[i] or j == n or ranks.get(parts[i] + parts[j]) != r:
                continue                                  # a pair an earlier merge changed
            parts[i], parts[j] = parts[i] + parts[j], b""
            j = nxt[i] = nxt[j]
            if j < n:
                prv[j] = i
            for a, b in ((prv[i], i), (i, j)):            # the new token's pairs
                if a >= 0 and b < n and (r := ranks.get(parts[a] + parts[b])) is not None:
                    heapq.heappush(heap, (r, a))
        ids = [ranks[p] for p in parts if p]
        if len(self._cache) < 200_000:
            self._cache[chunk] = ids
        return ids

    def chunks(self, text: str, allow_special: bool = False) -> list:
        """Text -> [(chunk, ids)]: the pieces encoding works on, each with
        its tokens. A special token's spelling inside ordinary text is
        ordinary text unless allow_special is True. For example, with
        GPT-2's merges: "Hello world!" -> [("Hello", [15496]),
        (" world", [995]), ("!", [0])]."""
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
        out = []
        for piece in pieces:
            if allow_special and piece in self.special:
                out.append((piece, [self.special[piece]]))
            else:
                out += [(chunk, self._bpe(chunk.encode("utf-8"))) for chunk in self._split.findall(piece)]
        return out

    def encode(self, text: str, allow_special: bool = False) -> list:
        """Text -> ids: "Hello world!" -> [15496, 995, 0] with GPT-2's merges."""
        return [i for _, chunk_ids in self.chunks(text, allow_special) for i in chunk_ids]

    def decode_bytes(self, ids) -> bytes:
        ids = list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, numpy.integer))]
        if bad:                                       # (65.9 would be 65, True 1)
            raise TypeError(f"ids: expected integer token ids, got {bad[0]!r}")
        try:
            return b"".join(self.decoder[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"ids: token id {e.args[0]} is out of range"
                             f" (the vocabulary has ids 0..{self.vocab_size - 1})") from None

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
                    raise ValueError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from None
        if special is None:
            special = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        try:
            return cls(ranks, special)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json(self) -> str:
        """A human-readable, versioned description: tokens in id order, each
        token's bytes shown as latin-1 characters (one character per byte)."""
        tokens = [self.decoder[i].decode("latin-1") for i in range(len(self.ranks))]
        return json.dumps({"format": TOKENIZER_FORMAT, "pattern": self.pattern,
                           "special": self.special, "tokens": tokens}, ensure_ascii=True, indent=0)

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer"):
        try:
            d = json.loads(text)
            if d.get("format") != TOKENIZER_FORMAT:
                raise ValueError(f"expected format {TOKENIZER_FORMAT!r}, got {d.get('format')!r}")
            ranks = {t.encode("latin-1"): i for i, t in enumerate(d["tokens"])}
            return cls(ranks, d["special"], d["pattern"])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ValueError(f"{source}: not a tokenizer file ({e})") from None

    def save(self, path: str):
        atomic_write(path, self.to_json().encode())

    @classmethod
    def load(cls, path: str):
        with open(path, "rb") as f:                   # (bytes: from_json names the file of bad UTF-8)
            return cls.from_json(f.read(), path)


def check_vocabulary(ranks: dict, special: dict, pattern: str):
    """A tokenizer's parts as BPE needs them (else a ValueError): ranks
    the ids 0..n-1 of distinct tokens including all 256 bytes, special ids
    distinct and after them, a non-empty pattern without capturing groups."""
    n = len(ranks)
    bad = [f"{b!r}: {i!r}" for b, i in ranks.items() if not (isinstance(b, bytes) and b and type(i) is int)]
    if bad or set(ranks.values()) != set(range(n)):
        raise ValueError(f"ranks: expected the ids 0..{n - 1}, each once, of tokens (bytes), got "
                         + (bad[0] if bad else f"ids {min(ranks.values())}..{max(ranks.values())}"))
    lacking = [b for b in range(256) if bytes([b]) not in ranks]
    if lacking:
        raise ValueError(f"ranks: expected every single byte (byte-level BPE), got none for bytes {lacking[:8]}")
    if not all(isinstance(s, str) and s and type(i) is int and i >= n for s, i in special.items()) \
            or len(set(special.values())) != len(special):
        raise ValueError(f"special: expected names with distinct ids >= {n} (after the ranks),"
                         f" got {str(special)[:80]}")
    try:
        groups = re.compile(pattern).groups if isinstance(pattern, str) and pattern else None
    except re.error as e:
        raise ValueError(f"pattern: {pattern[:60]!r}: {e}") from None
    if groups != 0:
        raise ValueError(f"pattern: expected a non-empty str without capturing groups (use (?:...)),"
                         f" got {str(pattern)[:60]!r}")


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
            if not is_count(v):
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
    y = x @ w
    if b is not None:
        y += b
    return y, (x, w)


def linear_backward(dy, cache, frozen=False):
    """-> dx, dW, db; a frozen weight (LoRA's base model) needs dx alone."""
    x, w = cache
    # y = xW + b  =>  dx = dy W^T,  dW = x^T dy,  db = sum of dy over rows
    if frozen:
        return dy @ w.T, None, None
    return dy @ w.T, x.T @ dy, dy.sum(0)


# ---- dropout: zero a fraction p of activations while training ---------------
# The survivors are scaled by 1/(1-p) so the expected value is unchanged. The
# masks come from the training loop's generator: a resumed run draws the same.

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

def causal_softmax(q, k):
    """softmax(q.k / sqrt(D)) over the keys each query may see -> (B, H, Tq, Tk).
    The queries are the last Tq of the Tk positions (all of them in training,
    the new ones in generation): query i sees keys 0..Tk-Tq+i. For T = 3:
    [[1, 0, 0], [a, 1-a, 0], [b, c, 1-b-c]]."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    att = (q @ k.swapaxes(-1, -2)) / math.sqrt(q.shape[-1])
    visible = xp.arange(Tk)[None, :] <= (Tk - Tq + xp.arange(Tq))[:, None]
    att = xp.where(visible, att, -xp.inf)
    att = xp.exp(att - att.max(-1, keepdims=True))
    return att / att.sum(-1, keepdims=True)


def attention_forward(q, k, v, dropout=0.0, rng=None):
    """q (B, H, Tq, D), k and v (B, H, Tk, D) -> (B, H, Tq, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = causal_softmax(q, k)                                        # (B, H, Tq, Tk)
    att_d, mask = dropout_forward(att, dropout, rng)
    return att_d @ v, (q, k, v, att, att_d, mask, scale)


def attention_backward(dy, cache):
    q, k, v, att, att_d, mask, scale = cache
    dv = att_d.swapaxes(-1, -2) @ dy
    datt = dropout_backward(dy @ v.swapaxes(-1, -2), mask)
    # softmax backward: ds_j = a_j (da_j - sum_i a_i da_i)
    ds = att * (datt - (datt * att).sum(-1, keepdims=True))
    return (ds @ k) * scale, (ds.swapaxes(-1, -2) @ q) * scale, dv


def join_heads(dq, dk, dv):
    """The split of c_attn's output into q, k, v, undone: 3 x (B, H, T, D)
    -> (B, T, 3, H, D), the gradient at c_attn's output."""
    return xp.stack([d.transpose(0, 2, 1, 3) for d in (dq, dk, dv)], axis=2)


# ---- LayerNorm: normalise each vector to mean 0, variance 1, then scale -----

def layernorm_forward(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dy, cache):
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
    t = xp.tanh(_GELU_C * (x + 0.044715 * (x * x * x)))    # x*x*x: float32 pow is slow
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    x, t = cache
    dt = _GELU_C * (1.0 + 3 * 0.044715 * (x * x))
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt)


# ---- the token embedding's backward ------------------------------------------
# The forward pass is a lookup, wte[idx]: row idx[b, t] for position (b, t).

def embedding_backward(dwte, idx, dx):
    """Add each position's gradient dx (B, T, C) into the row of its token in
    dwte (V, C), repeated tokens adding up. -> dwte."""
    numpy.add.at(dwte, idx, dx)
    return dwte


# ---- cross-entropy: how surprised the model is by the true next token ------
# loss = mean over counted positions of -log p(target). `mask` (B, T) chooses
# which positions count (instruction tuning counts the answer only).

def log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)                       # no overflow in exp
    return z - xp.log(xp.exp(z).sum(-1, keepdims=True))


def check_targets(logits, targets, mask=None):
    """targets, and mask if given, as arrays of the logits' shape less the last axis."""
    targets, mask = xp.asarray(targets), None if mask is None else xp.asarray(mask)
    for name, a in (("targets", targets), ("mask", mask)):
        if a is not None and a.shape != logits.shape[:-1]:
            raise ValueError(f"{name}: expected shape {logits.shape[:-1]}, got {a.shape}")
    return targets, mask


def cross_entropy_forward(logits, targets, mask=None):
    targets, mask = check_targets(logits, targets, mask)
    logp = log_softmax(logits)
    nll = -xp.take_along_axis(logp, targets[..., None], -1)[..., 0]  # (B, T)
    w = xp.ones(targets.shape, logits.dtype) if mask is None else mask.astype(logits.dtype)
    n = xp.maximum(w.sum(), 1)                                # all masked: loss 0, not 0/0
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


# ---- the layer table ---------------------------------------------------------
# The model calls the layers above through `ops`. It holds these NumPy
# functions; section 10 puts faster ones in their place, with the same
# arguments and results, so nothing below changes when it does.
ops = types.SimpleNamespace(**{f.__name__: f for f in (
    linear_forward, linear_backward, attention_forward, attention_backward, join_heads,
    layernorm_forward, layernorm_backward, gelu_forward, gelu_backward, embedding_backward,
    cross_entropy_forward, cross_entropy_backward)})


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
    """GPT-2. `params` maps names to arrays; forward() computes the logits
    (and the loss), then backward() the gradients under the same names."""

    def __init__(self, config: GPTConfig, params: dict = None, seed: int = 0):
        self.config = config
        self.params = params if params is not None else init_params(config, numpy.random.default_rng(seed))
        self.rng = None            # a numpy Generator while training with dropout
        self.lora = {}             # weight name -> LoRA settings (section 8)
        self.merged_lora = {}      # adapters folded into their weights
        self.frozen = set()        # names whose gradients are not needed
        self._cache = {}           # what backward needs, by layer name ("h.0.attn")

    def forward(self, idx, targets=None, mask=None, lengths=None, kv_cache=None):
        """ids (B, T) -> logits (B, T, V), and the mean cross-entropy loss
        when targets (B, T) are given (over positions where mask is nonzero).
        With lengths (B,), row b is padding from position lengths[b] on
        (hidden()); with a kv_cache (generation's, section 4), idx continues
        the positions it holds."""
        logits = self.lm_head(self.hidden(idx, kv_cache, lengths))
        if targets is None:
            return logits, None
        targets = check_ids(targets, self.config.vocab_size, "targets")
        loss, self._cache["loss"] = ops.cross_entropy_forward(logits, targets, mask)     # (checks the shapes)
        return logits, float(loss)

    def hidden(self, idx, kv_cache=None, lengths=None):
        """ids (B, T) -> the hidden states after the last block and ln_f (B, T, C).
        Rows of a batch differ in length: with lengths (B,), the positions of
        row b from lengths[b] on are padding, never computed (their hidden
        states are 0). Only attention sees the rows; every other layer works
        on the batch's N real tokens, one (N, C) matrix."""
        cfg, p = self.config, self.params
        idx = check_ids(idx, cfg.vocab_size, "idx")
        B, T = idx.shape
        past = 0 if kv_cache is None else kv_cache.check(cfg, B)
        if past + T > cfg.block_size:
            raise ValueError(f"idx: {past + T} positions exceed the context window block_size={cfg.block_size}")
        self._cache = {"idx": idx, "rows": (B, T, real_tokens(lengths, B, T))}
        x = self._tokens(p["wte.weight"][idx] + p["wpe.weight"][past:past + T])      # (N, C)
        x, self._cache["wte.drop"] = dropout_forward(x, cfg.dropout, self.rng)
        for i in range(cfg.n_layer):
            x = self.block(i, x, kv_cache)
        h, self._cache["ln_f"] = ops.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])
        return self._rows(h)

    def _tokens(self, a):
        """(B, T, ...) -> (N, ...): the real tokens of the last hidden()'s batch."""
        B, T, keep = self._cache["rows"]
        a = a.reshape(B * T, *a.shape[2:])
        return a if keep is None else a[keep]

    def _rows(self, a):
        """(N, ...) -> (B, T, ...), zeros at the padding: _tokens undone."""
        B, T, keep = self._cache["rows"]
        if keep is not None:
            a, rows = xp.zeros((B * T, *a.shape[1:]), a.dtype), a
            a[keep] = rows
        return a.reshape(B, T, *a.shape[1:])

    def block(self, i, x, kv_cache=None):
        """Transformer block i on the batch's tokens x (N, C): x + attn(ln_1(x)), then + mlp(ln_2(x))."""
        cfg, p, c, n = self.config, self.params, self._cache, f"h.{i}."
        (B, T, _), C = c["rows"], x.shape[1]
        H, drop, rng = cfg.n_head, cfg.dropout, self.rng
        # attention: each position gathers from the ones before it in its row
        a, c[n + "ln_1"] = ops.layernorm_forward(x, p[n + "ln_1.weight"], p[n + "ln_1.bias"])
        qkv = self._rows(self.linear(n + "attn.c_attn", a))                  # (B, T, 3C)
        q, k, v = qkv.reshape(B, T, 3, H, C // H).transpose(2, 0, 3, 1, 4)    # 3 x (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.extend(i, k, v)             # with the earlier positions': (B, H, past+T, D)
            if kv_cache.maps is not None:
                kv_cache.maps.append(causal_softmax(q, k))
        y, c[n + "attn"] = ops.attention_forward(q, k, v, drop, rng)
        y = self._tokens(y.transpose(0, 2, 1, 3).reshape(B, T, C))           # (N, C), heads side by side
        y, c[n + "attn.drop"] = dropout_forward(self.linear(n + "attn.c_proj", y), drop, rng)
        x = xp.add(x, y, out=y)         # x + y, into y's memory (a fresh array): no new array to fill
        # the MLP: each position on its own
        m, c[n + "ln_2"] = ops.layernorm_forward(x, p[n + "ln_2.weight"], p[n + "ln_2.bias"])
        f, c[n + "mlp.gelu"] = ops.gelu_forward(self.linear(n + "mlp.c_fc", m))
        f, c[n + "mlp.drop"] = dropout_forward(self.linear(n + "mlp.c_proj", f), drop, rng)
        return xp.add(x, f, out=f)

    def block_backward(self, i, dx, grads):
        """Block i backward: the gradient at its output (N, C) -> at its input."""
        cfg, c, n = self.config, self._cache, f"h.{i}."
        (B, T, _), (N, C) = c["rows"], dx.shape
        H = cfg.n_head
        # x + mlp(ln_2(x)): the residual passes dx through unchanged, the MLP adds its share
        df = self.linear_backward(n + "mlp.c_proj", dropout_backward(dx, c[n + "mlp.drop"]), grads)
        dm = self.linear_backward(n + "mlp.c_fc", ops.gelu_backward(df, c[n + "mlp.gelu"]), grads)
        dm, grads[n + "ln_2.weight"], grads[n + "ln_2.bias"] = ops.layernorm_backward(dm, c[n + "ln_2"])
        dx = xp.add(dx, dm, out=dm)    # (into dm's memory, as the forward's residual)
        # x + attn(ln_1(x))
        dy = self._rows(self.linear_backward(n + "attn.c_proj", dropout_backward(dx, c[n + "attn.drop"]), grads))
        dy = dy.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)                # (B, H, T, D)
        dqkv = ops.join_heads(*ops.attention_backward(dy, c[n + "attn"]))   # (B, T, 3, H, D)
        da = self.linear_backward(n + "attn.c_attn", self._tokens(dqkv).reshape(N, 3 * C), grads)
        da, grads[n + "ln_1.weight"], grads[n + "ln_1.bias"] = ops.layernorm_backward(da, c[n + "ln_1"])
        return xp.add(dx, da, out=da)

    def linear(self, name, x):
        """Layer `name` ("h.0.attn.c_attn"): x W + b, plus its LoRA adapter's share."""
        w, b = self.params[name + ".weight"], self.params.get(name + ".bias")
        y, self._cache[name] = ops.linear_forward(x, w, b)
        if name in self.lora:
            y_lora, self._cache[name + ".lora"] = lora_forward(self, name, x)
            y = y + y_lora
        return y

    def linear_backward(self, name, dy, grads):
        """Layer `name`'s backward: its gradients into grads -> dx."""
        frozen = name + ".weight" in self.frozen
        dx, dw, db = ops.linear_backward(dy, self._cache[name], frozen)
        if not frozen:
            grads[name + ".weight"], grads[name + ".bias"] = dw, db
        if name in self.lora:
            dx = dx + lora_backward(self, name, dy, self._cache[name + ".lora"], grads)
        return dx

    def lm_head(self, h):
        """The output head, tied to the token embedding: logits = h wte^T
        (B, T, V), of the last hidden()'s real tokens (0 at the padding)."""
        logits, self._cache["lm_head"] = ops.linear_forward(self._tokens(h), self.params["wte.weight"].T, None)
        return self._rows(logits)

    def backward(self, dlogits=None, dh=None, grads=None) -> dict:
        """Gradients of the loss of the last forward(), by parameter name
        (added to `grads` when given). dlogits replaces the cross-entropy's
        gradient (RLHF has losses of its own); dh adds a gradient on the
        hidden states, from a reward or value head (section 7), and is all
        there is after hidden() alone."""
        cfg, c = self.config, self._cache
        if dlogits is None and "loss" in c:
            dlogits = ops.cross_entropy_backward(c["loss"])
        if (dlogits is None and dh is None) or "rows" not in c:
            raise RuntimeError("backward: call forward() with targets first, or pass dlogits or dh")
        for name, d, width in (("dlogits", dlogits, cfg.vocab_size), ("dh", dh, cfg.n_embd)):
            if d is not None and xp.shape(d) != c["rows"][:2] + (width,):
                raise ValueError(f"{name}: expected shape {c['rows'][:2] + (width,)}, got {xp.shape(d)}")
        grads = {} if grads is None else grads
        dh = None if dh is None else self._tokens(dh)                        # (N, C), as dx below
        if dlogits is not None:
            dlogits = dlogits.astype(cfg.dtype, copy=False)       # a float64 scalar must not promote
            dhead, dwte_t, _ = ops.linear_backward(self._tokens(dlogits), c["lm_head"])
            grads["wte.weight"] = xp.ascontiguousarray(dwte_t.T)   # the head's share; the embedding's adds in place
            dh = dhead if dh is None else dhead + dh
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = ops.layernorm_backward(
            dh.astype(cfg.dtype, copy=False), c["ln_f"])
        for i in reversed(range(cfg.n_layer)):
            dx = self.block_backward(i, dx, grads)
        dx = self._rows(dropout_backward(dx, c["wte.drop"]))                  # (B, T, C)
        dwte = grads.get("wte.weight")
        dwte = xp.zeros_like(self.params["wte.weight"]) if dwte is None else dwte
        grads["wte.weight"] = ops.embedding_backward(dwte, c["idx"], dx)
        grads["wpe.weight"] = xp.zeros_like(self.params["wpe.weight"])
        grads["wpe.weight"][:dx.shape[1]] = dx.sum(0)
        for name in self.frozen:
            grads.pop(name, None)
        return grads

    def num_params(self) -> int:
        return sum(v.size for v in self.params.values())


def check_ids(idx, vocab_size, name):
    """Token ids must be a (B, T) integer array, or (T,) for one row, of
    in-range ids (a negative id would silently pick a row from the end of wte)."""
    a = idx if isinstance(idx, xp.ndarray) else numpy.asarray(idx)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected a (batch, time) array of token ids, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer token ids, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab_size):
        raise ValueError(f"{name}: token ids must be in 0..{vocab_size - 1}, got {int(a.min())}..{int(a.max())}")
    return xp.asarray(a).astype(xp.int64, copy=False)


def real_tokens(lengths, B, T):
    """lengths (B,) of rows padded to T -> the flat indices (N,) of their
    real tokens in a (B * T) array, or None when no row is padded."""
    if lengths is None:
        return None
    n = numpy.asarray(to_numpy(lengths))
    if n.shape != (B,) or n.dtype.kind not in "iu":
        raise ValueError(f"lengths: expected {B} integers (one per row), got {n.dtype} of shape {n.shape}")
    if B and (n.min() < 1 or n.max() > T):
        raise ValueError(f"lengths: expected lengths in 1..{T}, got {n.min()}..{n.max()}")
    if (n == T).all():
        return None
    return xp.asarray(numpy.flatnonzero(numpy.arange(T) < n[:, None]))


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

    def __post_init__(self):
        bias_corrections(self.betas, 1)                        # betas in [0, 1)

    def step(self, params: dict, grads: dict, lr: float = None, max_norm: float = None):
        """Step every parameter in grads. With max_norm, the gradients are
        clipped first (clip_scale), the factor applied as the step reads
        them, not in a pass of its own. -> their norm then (else None)."""
        self.t += 1
        for name in grads:
            if name not in self.m:
                self.m[name], self.v[name] = xp.zeros_like(params[name]), xp.zeros_like(params[name])
        norm, scale = (None, 1.0) if max_norm is None else clip_scale(grads, max_norm)
        ops.adamw_update(params, grads, self.m, self.v, self.lr if lr is None else lr, self.betas, self.eps,
                         self.weight_decay, self.t, scale)
        return norm


def adamw_update(params, grads, m, v, lr, betas, eps, weight_decay, t, gscale=1.0):
    """Step t of AdamW for every parameter in grads (params, m, v in place),
    each gradient multiplied by gscale first (clipping)."""
    b1, b2 = betas
    c1, c2 = bias_corrections(betas, t)
    for name, g in grads.items():
        p, mn, vn = params[name], m[name], v[name]
        g = g * gscale if gscale != 1.0 else g
        mn *= b1
        mn += (1 - b1) * g
        vn *= b2
        vn += (1 - b2) * (g * g)
        if p.ndim >= 2 and weight_decay:
            p *= 1.0 - lr * weight_decay
        p -= (lr / c1) * mn / (xp.sqrt(vn / c2) + eps)


def bias_corrections(betas, t):
    """Adam's bias corrections 1 - beta^t: m and v start at 0, so after t
    steps they are that fraction of what they estimate. For betas in [0, 1)
    and steps t >= 1 only (else 0, and the step m / 0)."""
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas: expected two numbers in [0, 1), got {betas}")
    if not t >= 1:
        raise ValueError(f"t: expected a step count >= 1, got {t}")
    return 1.0 - betas[0] ** t, 1.0 - betas[1] ** t


def sum_of_squares(arrays) -> float:
    """The sum of the squares of every entry of every array, in float64."""
    return float(sum((a.astype(xp.float64) ** 2).sum() for a in arrays))


ops.adamw_update, ops.sum_of_squares = adamw_update, sum_of_squares     # the table of section 2


def clip_scale(grads: dict, max_norm: float):
    """Gradient clipping: when the gradients' global L2 norm exceeds
    max_norm, all of them are scaled down together to it (one bad batch
    cannot throw the weights far). -> the norm, and that factor (else 1)."""
    norm = math.sqrt(ops.sum_of_squares(grads.values()))
    return norm, max_norm / (norm + 1e-6) if max_norm and norm > max_norm else 1.0


def lr_schedule(step: int, lr: float, min_lr: float, warmup: int, max_iters: int) -> float:
    """Linear warmup up to lr (lr / warmup at step 0), then cosine decay down to min_lr."""
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
# position's work: model.hidden(new_ids, kv_cache=kv), then the output head.

@dataclass
class KVCache:
    """The keys and values of the positions seen so far, per layer, each
    (B, H, T, D) with room for more: the model is fed its new positions only
    (GPT.block extends the cache), and their attention reads the earlier
    ones from here. With maps=[], every layer's attention probabilities are
    appended to it as well."""
    k: list = field(default_factory=list)          # per layer: room for (B, H, capacity, D)
    v: list = field(default_factory=list)
    n: list = field(default_factory=list)          # per layer: the positions stored
    maps: list = None

    @property
    def length(self) -> int:
        return self.n[0] if self.n else 0

    def extend(self, layer: int, k, v):
        """Append the new positions' keys and values -> all of them so far."""
        if not 0 <= layer <= len(self.k):
            raise ValueError(f"layer: expected 0..{len(self.k)} (a layer stored, or the next), got {layer}")
        if layer == len(self.k):
            self.k.append(k)
            self.v.append(v)
            self.n.append(0)
        else:
            T, new = self.n[layer], k.shape[2]
            self.reserve(layer, T + new)
            self.k[layer][:, :, T:T + new], self.v[layer][:, :, T:T + new] = k, v
        self.n[layer] += k.shape[2]
        return self.k[layer][:, :, :self.n[layer]], self.v[layer][:, :, :self.n[layer]]

    def check(self, cfg, B: int) -> int:
        """-> the positions stored, once the cache is found to be this model's
        (its layers and heads) for these B rows, every layer as far as the others."""
        if self.k:
            got, H = [(n, *k.shape[:2], k.shape[3]) for n, k in zip(self.n, self.k)], cfg.n_head
            if got != [(self.length, B, H, cfg.n_embd // H)] * cfg.n_layer:
                raise ValueError(f"kv_cache: expected n_layer={cfg.n_layer} layers of (positions, B, H, D) ="
                                 f" {(self.length, B, H, cfg.n_embd // H)}, got {got}")
        return self.length

    def reserve(self, layer: int, size: int):
        """Room for `size` positions in layer's keys and values, each one
        C-ordered array (when full: twice the room, so a position costs O(1))."""
        T = self.n[layer]
        for store in (self.k, self.v):
            old = store[layer]
            if size > old.shape[2] or not old.flags.c_contiguous:
                store[layer] = xp.empty(old.shape[:2] + (max(2 * T, size),) + old.shape[3:], old.dtype)
                store[layer][:, :, :T] = old[:, :, :T]


def next_logits(model: GPT, ids, kv: KVCache):
    """The logits of the token after each row of ids (B, T) -> (B, V): the
    output head on each row's last position only, the one sampling reads."""
    h = model.hidden(xp.asarray(ids), kv_cache=kv)[:, -1]                      # (B, C)
    return ops.linear_forward(h, model.params["wte.weight"].T, None)[0]


ops.next_logits = next_logits     # in the table too: section 10 runs a new token per row in one call


def check_sampling(temperature=1.0, top_k=None, top_p=None, max_new_tokens=0):
    if not (is_real(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if not is_count(max_new_tokens, least=0):
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if top_k is not None and not is_count(top_k):
        raise ValueError(f"top_k: expected an integer >= 1, got {top_k!r}")
    if top_p is not None and not (is_real(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected in (0, 1], got {top_p!r}")


def check_prompt(prompt, vocab_size, name) -> list:
    """One prompt: integer token ids in 0..vocab_size-1 -> a list of ints."""
    ids = check_ids(prompt, vocab_size, name)
    if len(ids) != 1:
        raise ValueError(f"{name}: expected one sequence of token ids, got shape {ids.shape}")
    return ids[0].tolist()


def over_temperature(logits, temperature):
    """logits / T -> (them, whether each row's largest stayed finite): where
    it did not, T is 0 or so near it that the division overflowed, and the
    likeliest token takes all the mass (greedy)."""
    with numpy.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = logits / temperature
    return z, abs(z.max(-1)) < math.inf


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """Logits (V,) -> the distribution to sample from. Temperature < 1
    sharpens it (0, or so near 0 that the largest logit / T overflows: all on
    the likeliest token), top-k keeps the k likeliest tokens, top-p (nucleus)
    keeps the smallest set whose probability reaches p."""
    check_sampling(temperature, top_k, top_p)
    logits = xp.asarray(logits, dtype=xp.float64)
    if logits.ndim != 1 or not logits.size or xp.isnan(logits).any():
        raise ValueError(f"logits: expected one row (V,) of numbers, got shape {logits.shape}"
                         + (" with NaN" if xp.isnan(logits).any() else ""))
    z, finite = over_temperature(logits, temperature)
    if not finite:
        return (xp.arange(logits.size) == int(logits.argmax())).astype(xp.float64)
    if top_k is not None or top_p is not None:
        order = xp.argsort(-z, kind="stable")            # likeliest first, ties: the lower id
    if top_k is not None:
        z[order[top_k:]] = -xp.inf                       # exactly k, ties or not
    probs = xp.exp(z - z.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        before = xp.cumsum(probs[order]) - probs[order]  # the mass before each token
        probs[order[before >= top_p * (1 - 1e-12)]] = 0.0    # (1e-12: a mass of exactly p, rounded)
        probs /= probs.sum()
    return probs


def generate(model: GPT, prompt, max_new_tokens=100, temperature=1.0, top_k=None,
             top_p=None, stop=(), seed=None, rng=None):
    """Yield new token ids one by one (streaming). temperature=0 is greedy.
    Generation ends after max_new_tokens or at a token in `stop` (not yielded).
    A prompt longer than the context window is cropped to its last block_size
    tokens; once the window is full, each step re-reads the last block_size
    tokens, as the model only ever saw that many."""
    prompt = check_prompt(prompt, model.config.vocab_size, "prompt")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    rng = rng if rng is not None else numpy.random.default_rng(seed)
    block = model.config.block_size
    tokens, kv = prompt[-block:], KVCache()
    for _ in range(max_new_tokens):
        logits = ops.next_logits(model, [tokens[kv.length:]], kv)[0]     # the tokens it has not seen
        if temperature == 0:
            nxt = int(xp.argmax(logits))
        else:
            probs = next_token_probs(logits, temperature, top_k, top_p)
            nxt = int(rng.choice(probs.size, p=to_numpy(probs)))
        if nxt in stop:
            return
        yield nxt
        tokens.append(nxt)
        if len(tokens) > block:                  # window full: re-read the last block tokens
            tokens, kv = tokens[-block:], KVCache()


def generate_batch(model: GPT, prompts, max_new_tokens=64, temperature=0.0, stop=(), rng=None):
    """Many prompts at once -> (token lists, ended flags). Prompts of equal
    length share one batch: a test set costs a few batched forward passes
    per token. Sampling is plain temperature sampling (Gumbel-max: argmax of
    logits/T plus Gumbel noise draws from softmax(logits/T)). A row ends at a
    stop token (ended) or when max_new_tokens or the context window runs out;
    a prompt longer than the window keeps its last block_size tokens."""
    check_sampling(temperature, max_new_tokens=max_new_tokens)
    rng = rng if rng is not None else numpy.random.default_rng(0)
    prompts = [check_prompt(p, model.config.vocab_size, f"prompts[{i}]")[-model.config.block_size:]
               for i, p in enumerate(prompts)]
    outs, ended = [None] * len(prompts), [False] * len(prompts)
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for length, rows in sorted(groups.items()):
        kv, done, got = KVCache(), numpy.zeros(len(rows), bool), [[] for _ in rows]
        new = [prompts[i] for i in rows]
        for _ in range(min(max_new_tokens, model.config.block_size - length + 1)):    # to the window's end
            logits = ops.next_logits(model, new, kv)
            if temperature == 0:
                nxt = to_numpy(xp.argmax(logits, -1))
            else:
                g, z = -numpy.log(-numpy.log(rng.random(logits.shape))), to_numpy(logits)
                zt, finite = over_temperature(z, temperature)
                nxt = numpy.where(finite, numpy.argmax(zt + g, -1), z.argmax(-1))
            for j, t in enumerate(nxt):
                if not done[j]:
                    if int(t) in stop:
                        done[j] = True
                    else:
                        got[j].append(int(t))
            if done.all():
                break
            new = nxt[:, None]
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
    i = ix[:, None] + numpy.arange(block_size)                                    # (B, T) positions
    data = numpy.asarray(data)
    return xp.asarray(data[i]), xp.asarray(data[i + 1])


def estimate_loss(model: GPT, data, batch_size, eval_iters, seed=0) -> float:
    """Mean loss over fixed random windows (the same ones every time)."""
    rng, drop = numpy.random.default_rng(seed), model.rng
    model.rng = None                              # no dropout while measuring
    bs = min(model.config.block_size, len(data) - 1)
    batches = [get_batch(data, bs, batch_size, rng) for _ in range(eval_iters)]
    losses = world.map(lambda part: [model.forward(*b)[1] for b in part], batches)   # each rank its share
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


def train_steps(model: GPT, state: TrainState, tc: TrainConfig, batch_fn, loss_fn=None,
                on_eval=None, save=None, stop_at=None, log=None):
    """The training loop shared by every stage: batch -> loss and gradients
    -> clip -> AdamW step, with the learning-rate schedule, gradient
    accumulation (grad_accum micro-batches per step, per rank when several
    train together), and an evaluation every eval_interval steps. batch_fn(rng)
    makes a batch, loss_fn(model, batch) -> (loss, grads), on_eval(step) ->
    validation loss; save() writes a checkpoint after each evaluation."""
    merged = {name + ab for name in model.merged_lora for ab in (".lora_A", ".lora_B")}   # LoRA's (section 8), in W now
    if not set(model.params) - model.frozen - merged:
        raise ValueError("model: every parameter is frozen; unmerge_lora(model) trains its adapters again")
    rng, loss_fn = numpy.random.default_rng(tc.seed), loss_fn or lm_loss
    if state.rng_state is not None:
        rng.bit_generator.state = state.rng_state
    if state.opt is None:
        state.opt = AdamW(tc.learning_rate, (0.9, tc.beta2), weight_decay=tc.weight_decay)
    dropout = model.config.dropout or any(a["dropout"] for a in model.lora.values())
    world.check(model, state, tc, batch_fn, rng)       # several ranks: all start alike (section 10)
    end = tc.max_iters if stop_at is None else min(stop_at, tc.max_iters)
    t0, tokens, first = time.time(), 0, state.step
    n = tc.grad_accum * world.size                     # micro-batches per step, all ranks together
    while state.step < end:
        lr = lr_schedule(state.step, tc.learning_rate, tc.min_lr, tc.warmup_iters, tc.max_iters)
        grads, loss = None, 0.0
        for i in range(n):
            batch = batch_fn(rng)                      # every rank draws every micro-batch...
            tokens += batch[0].size
            if i % world.size != world.rank:           # ...and computes its own share
                continue
            if dropout:                                # its masks: the same on any rank
                model.rng = numpy.random.default_rng([tc.seed, state.step, i])
            l, g = loss_fn(model, batch)
            loss += l / n
            grads = g if grads is None else {k: v + g[k] for k, v in grads.items()}
        # Data parallelism, the way LLMs are trained at scale: every rank (a
        # process, on this machine or another) holds the whole model and has
        # the gradients of its share of the batch; allreduce sums them over
        # the ranks, and every rank takes the same AdamW step. The model must
        # fit on each machine: tensor and pipeline parallelism split larger ones.
        loss = world.allreduce(grads, loss)[0]
        if not math.isfinite(loss):                    # stop before the weights are harmed
            raise FloatingPointError(f"loss: {loss} at step {state.step + 1}; the weights are those of step"
                                     f" {state.step} (try a lower learning rate)")
        if n > 1:
            for k in grads:
                grads[k] /= n
        state.opt.step(model.params, grads, lr, max_norm=tc.grad_clip)     # clipped, then AdamW
        state.step += 1
        state.rng_state = rng.bit_generator.state
        val = None
        if on_eval and (state.step % tc.eval_interval == 0 or state.step == tc.max_iters):
            val = on_eval(state.step)
        state.history.append((state.step, loss, val))
        if save and val is not None:
            save()
        if log:
            log(state.step, end, loss, val, tokens / max(time.time() - t0, 1e-9), time.time() - t0, first)
    model.rng = None
    return state


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Bits per byte: the tokenizer-independent way to compare models."""
    return loss_nats_per_token / math.log(2) / bytes_per_token


def pretrain(text: str, out: str, cfg: GPTConfig, tc: TrainConfig, resume=False,
             stop_at=None, log=None, tokenizer: Tokenizer = None, on_ready=None) -> dict:
    """Pretrain a GPT on `text`: the first 90% trains (and trains the
    tokenizer, unless one is given), the last 10% validates. Writes
    out/pretrain.safetensors at every evaluation and at the end, and
    out/metrics.json. With resume=True, continues from the checkpoint so the
    run ends with exactly the weights an uninterrupted run would have (the
    text must be the same). on_ready(model, bytes_per_token) is called once
    the text is tokenized."""
    ckpt = os.path.join(out, "pretrain.safetensors")
    cut = int(len(text) * 0.9)
    train_text, val_text = text[:cut], text[cut:]
    text_id = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    if resume and os.path.exists(ckpt):
        model, tokenizer, state, info = load_checkpoint(ckpt)
        if state is None:
            raise ValueError(f"{ckpt}: no training state to resume (a checkpoint of another stage?)")
        if info.get("text", text_id) != text_id:
            raise ValueError(f"text: not the text {ckpt} was trained on: resuming needs the same text")
    else:
        if tc.max_iters < 1:
            raise ValueError(f"max_iters: expected at least 1 step, got {tc.max_iters}")
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
        on_ready(model, bpt)
    world.agree(**{"the text's sha256": text_id})                       # several ranks: one text
    T, B = model.config.block_size, tc.batch_size

    def save():
        save_checkpoint(ckpt, model, tokenizer, state, stage="pretrain", train=asdict(tc), text=text_id,
                        ranks=world.size)

    t0, first = time.time(), state.step
    train_steps(model, state, tc, lambda rng: get_batch(train_ids, T, B, rng),
                on_eval=lambda step: estimate_loss(model, val_ids, B, tc.eval_iters),
                save=save, stop_at=stop_at, log=log)
    if state.step < tc.max_iters:                   # stopped early: keep the state
        save()
        return {}
    done = os.path.join(out, "metrics.json")
    if resume and state.step == first and os.path.exists(done):    # resumed when finished: no step ran, the figures stand
        with open(done) as f:
            return json.load(f)
    val = next(v for _, _, v in reversed(state.history) if v is not None)
    wall = time.time() - t0
    metrics = {"train_loss": estimate_loss(model, train_ids, B, tc.eval_iters),
               "val_loss": val, "bits_per_byte": bits_per_byte(val, bpt),
               "steps": state.step, "wall_seconds": wall,
               "tokens_per_second": (state.step - first) * tc.grad_accum * world.size * B * T / wall,  # every rank's
               "params": model.num_params(), "bytes_per_token": bpt}
    atomic_write(done, json.dumps(metrics, indent=2).encode())
    return metrics


# =============================================================================
# 6. Instruction tuning: from text continuer to assistant
# =============================================================================
# A pretrained model continues text; it does not answer. Instruction tuning
# (supervised fine-tuning, SFT) trains it on conversations written in a chat
# template: <|user|> question <|assistant|> answer <|end|>. The loss counts
# the answer's tokens only: the model learns to answer, not to ask. At
# inference the prompt ends with <|assistant|> and generation stops at <|end|>.

def chat_prompt(tok: Tokenizer, prompt: str, history=()) -> list:
    """<|user|> prompt <|assistant|>: what the model sees before answering,
    after the earlier turns of the conversation, history = [(user, answer)]."""
    ids = [i for user, answer in history for i in chat_example(tok, user, answer)[0]]
    return ids + [tok.special[USER]] + tok.encode(prompt) + [tok.special[ASSISTANT]]


def stop_tokens(tok: Tokenizer) -> set:
    """An answer ends where the model closes its turn (or starts another)."""
    return {tok.special[s] for s in (END, USER, ENDOFTEXT) if s in tok.special}


def encode_answer(tok: Tokenizer, answer: str) -> list:
    """An answer's ids. It is encoded after a space, as text after "A:" is, so
    its first word is the same token as everywhere else in the text (" Kenya",
    not the rare "Kenya" that only starts a document)."""
    return tok.encode(" " + answer)


def decode_answer(tok: Tokenizer, ids) -> str:
    """encode_answer's inverse: the text without that leading space."""
    text = tok.decode(ids)
    return text[1:] if text.startswith(" ") else text


def chat_example(tok: Tokenizer, prompt: str, answer: str, ended: bool = True):
    """-> (ids, n): the conversation's ids; ids[n:] is the answer (with <|end|>)."""
    head = chat_prompt(tok, prompt)
    return head + encode_answer(tok, answer) + ([tok.special[END]] if ended else []), len(head)


def pad_batch(examples, pad: int, block_size: int):
    """Examples (ids, n) -> x, y (B, T), a mask (B, T) that is 1 where y is
    an answer token, and each row's length (B,). Short rows are padded
    (masked out, and never computed: GPT.hidden); long ones lose their
    oldest tokens, so the answer always fits."""
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
    lengths = numpy.array([len(ids) - 1 for ids, _ in rows])
    return xp.asarray(x), xp.asarray(y), xp.asarray(mask), xp.asarray(lengths)


def answers(model: GPT, tok: Tokenizer, prompts, max_new_tokens=48, temperature=0.0, rng=None):
    """The model's answers to prompts -> (texts, ended, conversations): ended
    is True where it closed its turn with <|end|>; the conversations are
    (ids, n) as chat_example() makes them. Greedy unless a temperature is given."""
    heads = [chat_prompt(tok, p) for p in prompts]
    outs, ended = generate_batch(model, heads, max_new_tokens, temperature, stop_tokens(tok), rng)
    convs = [(h + o + ([tok.special[END]] if e else []), len(h)) for h, o, e in zip(heads, outs, ended)]
    return [decode_answer(tok, o) for o in outs], ended, convs


def sft(model: GPT, tok: Tokenizer, records, tc: TrainConfig, replay=None, replay_fraction=0.0,
        log=None) -> TrainState:
    """Instruction tuning on conversations {"prompt", "response"}, the loss
    on the answers only. With replay (pretraining token ids), that fraction
    of each batch is plain pretraining text, all of it counted: without it,
    a small model forgets the facts it was never asked about while it learns
    to answer. -> the TrainState (its history has the losses)."""
    if not records:
        raise ValueError("records: expected at least one conversation")
    examples = [chat_example(tok, r["prompt"], r["response"]) for r in records]
    T = model.config.block_size
    n_replay = int(round(tc.batch_size * replay_fraction)) if replay is not None else 0

    def batch_fn(rng):
        rows = [examples[i] for i in rng.integers(0, len(examples), tc.batch_size - n_replay)]
        for i in (rng.integers(0, len(replay) - T - 1, n_replay) if n_replay else ()):
            rows.append((list(replay[i:i + T + 1]), 1))
        return pad_batch(rows, tok.special[END], T)
    return train_steps(model, TrainState(), tc, batch_fn, log=log)


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
    w = rng.normal(0.0, 1.0 / math.sqrt(C), C) if rng is not None else numpy.zeros(C)
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
    dh[rows, pos] = dout[..., None] * model.params[name + ".weight"]  # each position read once
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
    """The reward of each row: the score head at its last token -> (B,), h."""
    h = model.hidden(x, lengths=last + 1)
    return head_forward(model, "score", h, last[:, None])[:, 0], h


def bradley_terry(margin):
    """Bradley-Terry: P(chosen beats rejected) = sigmoid(margin), a pair's
    margin the chosen answer's score less the rejected one's. -> the loss,
    -log of it averaged over the pairs, and its gradient per margin."""
    return float(xp.logaddexp(0.0, -margin).mean()), -1.0 / (1.0 + xp.exp(margin)) / len(margin)


def reward_loss(model: GPT, batch):
    """The reward model's loss: Bradley-Terry on the score margins.
    batch = (ids, last) from reward_batch(), chosen rows first."""
    x, last = batch
    r, h = reward_scores(model, x, last)
    n = len(r) // 2
    loss, dmargin = bradley_terry(r[:n] - r[n:])
    dr = xp.concatenate([dmargin, -dmargin])
    grads = {}
    dh = head_backward(model, "score", h, last[:, None], dr[:, None], grads)
    return loss, model.backward(dh=dh, grads=grads)


def train_reward_model(model: GPT, tok: Tokenizer, pairs, tc: TrainConfig, lora: dict = None,
                       log=None) -> TrainState:
    """The reward model: the instruction-tuned model with a score head (a
    random one is added if it has none), trained with the Bradley-Terry loss
    on preference pairs {"prompt", "chosen", "rejected"}. With lora (add_lora's
    keyword arguments, section 8) only adapters and the head train, merged at
    the end: the model keeps what it knows, which judging a fact needs."""
    if not pairs:
        raise ValueError("pairs: expected at least one preference pair")
    if lora is not None:
        add_lora(model, **lora)
    if "score.weight" not in model.params:
        add_head(model, "score", numpy.random.default_rng(tc.seed))

    def batch_fn(rng):
        batch = [pairs[i] for i in rng.integers(0, len(pairs), tc.batch_size)]
        return reward_batch(tok, pair_examples(tok, batch), model.config.block_size)
    state = train_steps(model, TrainState(), tc, batch_fn, reward_loss, log=log)
    merge_lora(model)
    return state


def score_conversations(rm: GPT, tok: Tokenizer, examples):
    """Reward-model scores of conversations (ids, n) -> (B,)."""
    return reward_scores(rm, *reward_batch(tok, examples, rm.config.block_size))[0]


def reward_accuracy(model: GPT, tok: Tokenizer, pairs, batch_size=32) -> float:
    """The share of pairs whose chosen answer scores above the rejected."""
    wins = 0
    for i in range(0, len(pairs), batch_size):
        r = score_conversations(model, tok, pair_examples(tok, pairs[i:i + batch_size]))
        wins += int((r[:len(r) // 2] > r[len(r) // 2:]).sum())
    return wins / max(len(pairs), 1)


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
    target_kl: float = 0.7         # adapt kl_coef toward this KL per answer (0: fixed)
    clip: float = 0.2              # ratio clip, and value clip
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    ptx_coef: float = 1.0          # weight of the pretraining loss in each update (PPO-ptx; 0: none)
    ptx_batch: int = 8             # pretraining windows per update
    seed: int = 0


def sequence_logprobs(model: GPT, x, y, lengths=None):
    """log p(y_t | x_<=t) for every position -> (B, T); also the log-softmax
    (B, T, V), for backward, and the hidden states (B, T, C), for a value head."""
    h = model.hidden(x, lengths=lengths)
    logp = log_softmax(model.lm_head(h))
    return xp.take_along_axis(logp, y[..., None], -1)[..., 0], logp, h


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


def sampled_answers(policy: GPT, tok: Tokenizer, prompts, pc: PPOConfig, rng):
    """answers() at PPO's temperature; with several ranks each answers its share."""
    return world.map(lambda ps, r: answers(policy, tok, ps, pc.max_new_tokens, pc.temperature, r), prompts, rng)


def ppo_rollout(policy: GPT, ref: GPT, rm: GPT, tok: Tokenizer, prompts, pc: PPOConfig, rng, norm=(0.0, 1.0)):
    """Answer each prompt by sampling, then score: per-token rewards are
    -kl_coef (log pi - log pi_ref), and the last token also gets the
    reward model's score, normalised by norm = (mean, std)."""
    texts, ended, examples = sampled_answers(policy, tok, prompts, pc, rng)
    x, y, mask, lengths = pad_batch(examples, tok.special[END], policy.config.block_size)
    logp, _, h = sequence_logprobs(policy, x, y, lengths)
    values = head_forward(policy, "value", h, xp.broadcast_to(xp.arange(x.shape[1]), x.shape))
    ref_logp, _, _ = sequence_logprobs(ref, x, y, lengths)
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
    return dict(x=x, y=y, mask=mask, lengths=lengths, logp=logp, values=values, adv=adv, ret=ret,
                score=score, raw_score=raw, kl=float(kl.sum() / len(prompts)), texts=texts, ended=ended)


def ppo_loss(policy: GPT, mb: dict, pc: PPOConfig, n=None):
    """The clipped surrogate objective plus the clipped value loss, averaged
    over n answer tokens (default: the minibatch's)."""
    x, y, mask, adv = mb["x"], mb["y"], mb["mask"], mb["adv"]
    n = mask.sum() if n is None else n
    logp, logp_all, h = sequence_logprobs(policy, x, y, mb["lengths"])
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
    policy.backward(logprob_backward(logp_all, y, dlogp), dh, grads)
    p = xp.exp(logp_all)
    stats = {"pg_loss": float(pg_loss), "vf_loss": float(vf_loss),
             "clip_frac": float(((xp.abs(ratio - 1) > pc.clip) * mask).sum() / n),
             "entropy": float((-(p * logp_all).sum(-1) * mask).sum() / n)}
    return float(pg_loss + pc.vf_coef * vf_loss), grads, stats


def adapt_kl_coef(kl_coef, kl, target_kl, k_beta=0.1):
    """The adaptive KL controller of Ziegler et al. (2019): a rollout that
    strayed further than target_kl from the reference raises the penalty, one
    that stayed closer lowers it, by at most 2% a rollout: a run whose reward
    pulls it away fast is held back harder than one that drifts slowly."""
    return kl_coef * (1 + k_beta * float(numpy.clip(kl / target_kl - 1, -0.2, 0.2)))


def ptx_grads(policy: GPT, x, y, grads, coef: float, share: float = 1.0) -> float:
    """The pretraining term of PPO-ptx (Ouyang et al., 2022): add coef times
    the gradient of the pretraining loss on windows x -> y to grads, so that
    chasing the reward model does not unlearn the facts pretraining taught
    (the reward model cannot catch every wrong one). share: these rows'
    part of all the windows (several ranks). -> its loss."""
    _, loss = policy.forward(x, y)
    for k, g in policy.backward().items():
        grads[k] = grads[k] + g * (coef * share)
    return loss * share


def ppo(policy: GPT, ref: GPT, rm: GPT, tok: Tokenizer, prompts, pc: PPOConfig, log=None,
        replay=None) -> list:
    """Proximal policy optimisation: rollout, then several epochs of
    minibatch updates on it, again and again. The policy gets a value head
    for it, removed at the end. replay: pretraining token ids for
    pc.ptx_coef's term (none without them). Returns one dict per rollout."""
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    if world.size > 1 and pc.prompts_per_iter // pc.minibatches < world.size:
        raise ValueError(f"prompts_per_iter: {world.size} ranks need {world.size} rows in each of the"
                         f" {pc.minibatches} minibatches, got {pc.prompts_per_iter} prompts per rollout")
    rng = numpy.random.default_rng(pc.seed)
    if "value.weight" not in policy.params:
        add_head(policy, "value")
    opt = AdamW(pc.learning_rate, (0.9, 0.95), weight_decay=0.0)
    history, kl_coef = [], pc.kl_coef
    t0 = time.time()
    # The reward model's scale is arbitrary: normalise its scores so that the
    # starting policy's answers score mean 0 and standard deviation 1.
    calib = [prompts[i] for i in rng.choice(len(prompts), min(len(prompts), 64), replace=False)]
    _, _, examples = sampled_answers(policy, tok, calib, pc, rng)
    s = to_numpy(score_conversations(rm, tok, examples))
    norm = (float(s.mean()), float(s.std()) + 1e-6)
    for it in range(pc.iters):
        batch = [prompts[i] for i in rng.choice(len(prompts), pc.prompts_per_iter, replace=False)]
        ro = ppo_rollout(policy, ref, rm, tok, batch, PPOConfig(**{**asdict(pc), "kl_coef": kl_coef}), rng, norm)
        stats = []
        for _ in range(pc.epochs):
            order = rng.permutation(len(batch))
            for part in numpy.array_split(order, pc.minibatches):
                n = ro["mask"][xp.asarray(part)].sum()           # the minibatch's answer tokens
                mine = xp.asarray(part[world.rank::world.size])  # several ranks: each takes its share
                mb = {k: ro[k][mine] for k in ("x", "y", "mask", "lengths", "logp", "values", "adv", "ret")}
                loss, grads, s = ppo_loss(policy, mb, pc, n)
                if replay is not None and pc.ptx_coef:
                    x, y = get_batch(replay, policy.config.block_size, pc.ptx_batch, rng)
                    x, y = x[world.rank::world.size], y[world.rank::world.size]   # each rank its share
                    s["ptx_loss"] = ptx_grads(policy, x, y, grads, pc.ptx_coef,
                                              len(x) / pc.ptx_batch) if len(x) else 0.0
                s = dict(zip(s, world.allreduce(grads, *s.values())))  # then the sums, as in train_steps
                opt.step(policy.params, grads, max_norm=1.0)
                stats.append(s)
        row = {"iter": it + 1, "reward": float(ro["raw_score"].mean()), "kl": ro["kl"],
               "kl_coef": kl_coef, **{k: float(numpy.mean([s[k] for s in stats])) for k in stats[0]}}
        history.append(row)
        if pc.target_kl:
            kl_coef = adapt_kl_coef(kl_coef, ro["kl"], pc.target_kl)
        if log:
            log(row, time.time() - t0)
    for k in ("value.weight", "value.bias"):
        del policy.params[k]
    return history


def kl_to_reference(policy: GPT, ref: GPT, tok: Tokenizer, prompts, answers):
    """KL(policy || reference) of the next-token distributions, summed over
    each answer's positions -> (B,): how far RLHF moved the model."""
    examples = [chat_example(tok, p, a) for p, a in zip(prompts, answers)]
    x, y, mask, lengths = pad_batch(examples, tok.special[END], policy.config.block_size)
    _, lp, _ = sequence_logprobs(policy, x, y, lengths)
    _, lq, _ = sequence_logprobs(ref, x, y, lengths)
    return ((xp.exp(lp) * (lp - lq)).sum(-1) * mask).sum(1)

# ---- DPO -------------------------------------------------------------------
# The policy's own log-probability ratio to the reference acts as an implicit
# reward; the Bradley-Terry loss on it trains the policy directly:
#   loss = -log sigmoid(beta [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))])

def dpo_loss(policy: GPT, ref: GPT, batch, beta: float):
    """batch = pad_batch(pair_examples(...)): chosen rows first."""
    x, y, mask, lengths = batch
    (ref_logp, _, _), (logp, logp_all, _) = (sequence_logprobs(m, x, y, lengths) for m in (ref, policy))
    ref_lp, lp = (ref_logp * mask).sum(1), (logp * mask).sum(1)     # each row's answer's log-probability
    n = len(lp) // 2
    loss, dz = bradley_terry(beta * ((lp[:n] - ref_lp[:n]) - (lp[n:] - ref_lp[n:])))
    drow = beta * xp.concatenate([dz, -dz])                          # d loss / d lp per row
    dlogits = logprob_backward(logp_all, y, drow[:, None] * mask)
    return loss, policy.backward(dlogits)


def dpo(policy: GPT, ref: GPT, tok: Tokenizer, pairs, tc: TrainConfig, beta: float = 0.5, log=None) -> TrainState:
    """DPO on preference pairs {"prompt", "chosen", "rejected"}, the frozen
    reference (a copy of the policy before) holding it back through beta."""
    if not pairs:
        raise ValueError("pairs: expected at least one preference pair")

    def batch_fn(rng):
        batch = [pairs[i] for i in rng.integers(0, len(pairs), tc.batch_size)]
        return pad_batch(pair_examples(tok, batch), tok.special[END], policy.config.block_size)
    return train_steps(policy, TrainState(), tc, batch_fn, lambda m, b: dpo_loss(m, ref, b, beta), log=log)


# =============================================================================
# 8. Task fine-tuning: LoRA
# =============================================================================
# Fine-tuning every weight for one task is costly and can erase what the
# model knew. LoRA freezes the model and learns a low-rank correction for
# chosen matrices: x W becomes x W + (alpha/r) (x A) B, with A (in, r) and
# B (r, out), r small. B starts at zero, so training starts exactly at the
# base model; only A and B (a few percent of the parameters) are trained.

def add_lora(model: GPT, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
             r: int = 8, alpha: float = 16.0, dropout: float = 0.0, seed: int = 0) -> list:
    """Attach LoRA adapters to every linear layer whose name ends with one of
    `targets`, freeze the transformer's own weights (freeze_base), and return
    the adapters' names."""
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
    freeze_base(model)
    return [n for n in model.params if ".lora_" in n]


def freeze_base(model: GPT):
    """With LoRA the transformer's own weights are frozen: only the adapters
    train (and a head of section 7's, where the model has one)."""
    model.frozen = set(param_shapes(model.config))


def lora_forward(model, name, x):
    """The adapter's share of layer `name`'s output, scale * (x A) B: itself
    two linear layers without bias. -> (M, out), and its cache."""
    a, b = model.params[name + ".lora_A"], model.params[name + ".lora_B"]
    xd, mask = dropout_forward(x, model.lora[name]["dropout"], model.rng)
    xa, cache_a = ops.linear_forward(xd, a, None)                      # (M, r)
    y, cache_b = ops.linear_forward(xa, b, None)
    return y * model.lora[name]["scale"], (mask, cache_a, cache_b)


def lora_backward(model, name, dy, cache, grads):
    mask, cache_a, cache_b = cache
    dxa, grads[name + ".lora_B"], _ = ops.linear_backward(dy * model.lora[name]["scale"], cache_b)
    dxd, grads[name + ".lora_A"], _ = ops.linear_backward(dxa, cache_a)
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


def finetune(model: GPT, tok: Tokenizer, records, tc: TrainConfig, lora: dict = None, general=(),
             replay=None, replay_fraction=0.0, log=None, general_share=0.35) -> TrainState:
    """Task fine-tuning on conversations: instruction tuning (sft()) on the
    task's, with general conversations (from `general`) mixed in, as many as
    general_share of the task's, so the old skill is not overwritten. With LoRA adapters
    (lora: add_lora's keyword arguments) the adapters train and are merged
    into their weights at the end (save_lora still writes them); with
    lora=None every weight trains."""
    if lora is not None:
        add_lora(model, **lora)
    rng = numpy.random.default_rng(tc.seed)
    mixed = list(records)
    if general:
        mixed += [general[i] for i in rng.choice(len(general), int(len(records) * general_share), replace=False)]
    state = sft(model, tok, mixed, tc, replay, replay_fraction, log)
    merge_lora(model)
    return state


def trainable_fraction(model: GPT) -> float:
    """The share of the model's parameters that fine-tuning changes."""
    base = sum(model.params[k].size for k in param_shapes(model.config))
    train = sum(v.size for k, v in model.params.items() if k not in model.frozen and ".lora_" in k)
    return train / base if model.lora or model.merged_lora else 1.0


def lora_shapes(lora, shapes: dict) -> dict:
    """LoRA metadata, {layer: {"scale", "dropout", "r", "alpha"}}, checked
    against the shapes of the model's parameters -> the adapter tensors it
    needs, {layer.lora_A: (in, r), layer.lora_B: (r, out)}."""
    if not (isinstance(lora, dict) and all(
            isinstance(s, dict) and all(is_number(s.get(k)) for k in ("scale", "dropout", "r", "alpha"))
            and 0 <= s["dropout"] < 1 and is_count(s["r"]) for s in lora.values())):
        raise ValueError(f"lora: expected {{layer: {{scale, dropout in [0, 1), r >= 1, alpha}}}}, got {str(lora)[:80]}")
    adapters = {}
    for name, s in lora.items():
        w = shapes.get(name + ".weight", ())
        if not name.startswith("h.") or len(w) != 2:            # (add_lora adapts the blocks' linear layers)
            raise ValueError(f"lora: {name!r} is not a linear layer of the model")
        adapters.update({name + ".lora_A": (w[0], s["r"]), name + ".lora_B": (s["r"], w[1])})
    return adapters


def save_lora(path: str, model: GPT):
    """The adapter alone: A and B of every adapted layer, a few percent of
    the model, applied later to the same base model with load_lora()."""
    save_safetensors(path, {k: v for k, v in model.params.items() if ".lora_" in k},
                     {"format": "llm-lora-v1", "lora": json.dumps({**model.lora, **model.merged_lora}),
                      "config": json.dumps(asdict(model.config))})


def load_lora(path: str, model: GPT):
    """save_lora's adapters, applied to `model`: the base model they were
    trained on (its config, if the file records it, and its weights' shapes)."""
    if model.lora or model.merged_lora:
        raise ValueError(f"model: has adapters already ({'merged into its weights' if model.merged_lora else 'unmerged'}):"
                         f" {path}'s would add to them or leave them behind (load it onto the base model)")
    tensors, meta = load_safetensors(path)
    try:
        if meta.get("format") != "llm-lora-v1":
            raise ValueError(f"not an llm LoRA adapter (metadata format {meta.get('format')!r})")
        base = json.loads(meta.get("config", "{}"))                     # (earlier files have none)
        if any(base.get(k, v) != v for k, v in asdict(model.config).items() if k != "dropout"):
            raise ValueError(f"adapters of another model ({meta['config']}), not of {model.config}")
        lora = json.loads(meta.get("lora", "null"))
        want = lora_shapes(lora, {k: v.shape for k, v in model.params.items()})
        want = {k: (model.config.dtype, shape) for k, shape in want.items()}
        got = {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
        if got != want:
            k = min(set(got) ^ set(want) or {k for k in got if got[k] != want[k]})
            raise ValueError(f"adapter tensor {k!r} is {got.get(k, 'missing')}; the model needs"
                             f" {want.get(k, 'no such tensor')}")
    except (ValueError, AttributeError, RecursionError) as e:
        raise ValueError(f"{path}: {e}") from None
    model.params.update(tensors)
    model.lora = lora
    freeze_base(model)


# =============================================================================
# 9. Checkpoints: safetensors, written with NumPy
# =============================================================================
# The safetensors format: an 8-byte little-endian header length, a JSON
# header giving each tensor's dtype, shape and byte range, then the raw
# bytes. No pickle: loading a file never runs code. Written atomically.

_ST_DTYPES = {"F64": numpy.float64, "F32": numpy.float32, "F16": numpy.float16,
              "I64": numpy.int64, "I32": numpy.int32, "U8": numpy.uint8, "BF16": None}


def save_safetensors(path: str, tensors: dict, metadata: dict = None):
    header, offset, blobs = {}, 0, []
    names = {numpy.dtype(v): k for k, v in _ST_DTYPES.items() if v is not None}
    for name, arr in tensors.items():
        arr = numpy.asarray(to_numpy(arr))                 # (0-d stays 0-d; tobytes() is C order)
        if arr.dtype not in names:
            raise TypeError(f"tensors[{name!r}]: unsupported dtype {arr.dtype}")
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    data = b"".join(blobs)
    # A checksum of the whole file: a file damaged on disk is refused, not
    # trained on. It is the sha256 of the file with the checksum's own 64
    # digits as zeros (the last thing in the header), written in their place.
    header["__metadata__"] = {**{k: str(v) for k, v in (metadata or {}).items() if k != "checksum"},
                              "checksum": "0" * 64}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                  # align the data to 8 bytes
    head = struct.pack("<Q", len(head)) + head
    checksum, at = hashlib.sha256(head), head.rindex(b"0" * 64)
    checksum.update(data)
    atomic_write(path, head[:at] + checksum.hexdigest().encode() + head[at + 64:] + data)


def bf16_to_float32(words):
    """bfloat16 is the top 16 bits of a float32 (same sign and exponent, a
    shorter mantissa): shifting the words back up gives the float32 exactly."""
    return (numpy.asarray(words, numpy.uint16).astype(numpy.uint32) << 16).view(numpy.float32)


def load_safetensors(path: str):
    """-> (tensors, metadata). A missing, truncated, damaged or foreign file
    is a ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file of {len(raw)})")
    try:
        header = json.loads(raw[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from None
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: __metadata__ must map names to strings, got {str(meta)[:80]!r}")
    data, tensors, spans = raw[8 + n:], {}, []
    for name, t in header.items():
        try:
            dtype = _ST_DTYPES[t["dtype"]]
            begin, end = t["data_offsets"]
            shape = tuple(t["shape"])
            if not all(type(d) is int and d >= 0 for d in shape + (begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {str(t)[:80]}") from None
        bf16 = dtype is None                        # NumPy has no bfloat16: read the 16-bit words
        dtype = numpy.uint16 if bf16 else dtype
        count = math.prod(shape)
        if not 0 <= begin <= end <= len(data) or end - begin != count * numpy.dtype(dtype).itemsize:
            raise ValueError(f"{path}: truncated or corrupt (tensor {name!r} wants bytes"
                             f" {begin}..{end} of {len(data)})")
        try:
            arr = numpy.frombuffer(data, dtype=numpy.dtype(dtype).newbyteorder("<"),
                                   count=count, offset=begin).reshape(shape).astype(dtype)
        except ValueError as e:                     # no bytes, but more dimensions than NumPy's, or huge ones
            raise ValueError(f"{path}: tensor {name!r} has an impossible shape ({e})") from None
        tensors[name] = xp.asarray(bf16_to_float32(arr) if bf16 else arr)
        spans.append((begin, end))
    spans.sort()                                    # the byte ranges must tile the data: 0..e0, e0..e1, ...
    if [0] + [end for _, end in spans] != [begin for begin, _ in spans] + [len(data)]:
        raise ValueError(f"{path}: corrupt: the tensors' byte ranges do not tile its {len(data)} bytes of data"
                         " (they overlap, or leave bytes unread)")
    if "checksum" in meta:                          # save_safetensors' (its digits as zeros, as it was taken)
        digits = meta["checksum"].encode()
        at = raw.rfind(digits, 0, 8 + n)          # where save_safetensors put them: the last in the header
        checksum = hashlib.sha256(raw[:at] + b"0" * len(digits) + raw[at + len(digits):8 + n])
        checksum.update(memoryview(raw)[8 + n:])
        if at < 0 or checksum.hexdigest().encode() != digits:
            raise ValueError(f"{path}: corrupt: the file's bytes do not match its checksum")
    elif "sha256" in meta:                          # earlier versions': the tensor bytes alone
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError(f"{path}: corrupt: the tensor bytes do not match the file's checksum")
    elif meta.get("format") in ("llm-checkpoint-v1", "llm-lora-v1"):
        raise ValueError(f"{path}: no checksum, which llm has written in every file since a00d981: damaged (or older)")
    else:
        warn(f"{path}: no checksum in the file (written by another program?): its bytes are not checked")
    return tensors, meta


def save_checkpoint(path: str, model: GPT, tokenizer: Tokenizer, state: TrainState = None, **info):
    """Weights, config, tokenizer, optimizer state, step and RNG state in one
    file. `info` adds JSON-able metadata (the stage, training settings...).
    Merged LoRA adapters are written too, as merged: unmerge_lora() works
    on the loaded model, and load_lora() will not add them a second time."""
    if tokenizer.vocab_size != model.config.vocab_size:      # (load_checkpoint would refuse the file)
        raise ValueError(f"tokenizer: has {tokenizer.vocab_size} ids; the model's vocab_size is {model.config.vocab_size}")
    tensors = dict(model.params)
    meta = {"format": "llm-checkpoint-v1", "config": json.dumps(asdict(model.config)),
            "tokenizer": tokenizer.to_json(), "lora": json.dumps(model.lora),
            "merged_lora": json.dumps(model.merged_lora), "info": json.dumps(info)}
    if state is not None:
        for name in state.opt.m if state.opt else ():
            tensors["optimizer.m." + name] = state.opt.m[name]
            tensors["optimizer.v." + name] = state.opt.v[name]
        opt = ({k: getattr(state.opt, k) for k in ("lr", "betas", "eps", "weight_decay", "t")}
               if state.opt else None)                # (asdict would deep-copy m and v)
        meta["state"] = json.dumps({"step": state.step, "opt": opt, "rng_state": state.rng_state,
                                    "history": state.history})
    save_safetensors(path, tensors, meta)
    world.barrier()                # several ranks: none reads it before rank 0 has written it


def load_checkpoint(path: str):
    """-> (model, tokenizer, state, info), every part checked against the
    config the file carries: a damaged file is a ValueError naming the file
    and what is wrong, here and not later inside forward()."""
    tensors, meta = load_safetensors(path)
    if meta.get("format") != "llm-checkpoint-v1":
        raise ValueError(f"{path}: a safetensors file, but not an llm checkpoint"
                         f" (metadata format {meta.get('format')!r})")
    params = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    try:
        config = GPTConfig(**json.loads(meta["config"]))
        tokenizer = Tokenizer.from_json(meta["tokenizer"], "tokenizer")
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"its tokenizer has {tokenizer.vocab_size} ids, its config's vocab_size"
                             f" is {config.vocab_size}")
        lora, info = json.loads(meta.get("lora", "{}")), json.loads(meta.get("info", "{}"))
        merged = json.loads(meta.get("merged_lora", "{}"))               # (earlier files have none)
        s = json.loads(meta["state"]) if "state" in meta else None
        if not isinstance(info, dict):
            raise ValueError(f"info: expected a JSON object, got {str(info)[:80]}")
        if 12 * config.n_layer + 4 > len(params):        # (before listing the names of 2**60 layers)
            raise ValueError(f"its config's n_layer={config.n_layer} needs more tensors than its {len(params)}")
        C, expected = config.n_embd, param_shapes(config)
        expected.update({f"{h}.{p}": shape for h in ("score", "value") for p, shape in (("weight", (C,)), ("bias", ()))})
        adapters = lora_shapes(lora, expected)
        adapters.update(lora_shapes(merged, expected))
        if set(lora) & set(merged):
            raise ValueError(f"lora: {sorted(set(lora) & set(merged))[0]!r} both merged and not")
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({e})") from None
    expected.update(adapters)
    missing = (set(param_shapes(config)) | set(adapters)) - set(params)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensors {sorted(missing)[:5]}")
    for k, v in tensors.items():
        want = expected.get(re.sub(r"^optimizer\.[mv]\.", "", k) if s else k)   # AdamW's moments: their parameter's
        if want is None or tuple(v.shape) != want or v.dtype != config.dtype:
            raise ValueError(f"{path}: tensor {k!r} is {v.dtype} {tuple(v.shape)}; the config the file"
                             f" carries expects " + ("no such tensor" if want is None else f"{config.dtype} {want}"))
    model = GPT(config, params)
    model.lora, model.merged_lora = lora, merged
    if lora or merged:
        freeze_base(model)
    if s is None:
        return model, tokenizer, None, info
    try:
        opt = None
        if s["opt"] is not None:
            opt = AdamW(**{**s["opt"], "betas": tuple(float(b) for b in s["opt"]["betas"])})
            opt.m = {k[12:]: v for k, v in tensors.items() if k.startswith("optimizer.m.")}
            opt.v = {k[12:]: v for k, v in tensors.items() if k.startswith("optimizer.v.")}
        state = TrainState(s["step"], opt, s["rng_state"], [tuple(h) for h in s["history"]])
        if not all(len(h) == 3 and type(h[0]) is int and is_number(h[1]) and (h[2] is None or is_number(h[2]))
                   for h in state.history):
            raise ValueError("history: expected (step, loss, validation loss or None) rows")
        if type(state.step) is not int or state.step < 0 or opt and not (type(opt.t) is int and opt.t >= 0 and all(
                map(is_number, (opt.lr, opt.eps, opt.weight_decay, *opt.betas)))):
            raise ValueError(f"step {state.step!r} or optimizer {s['opt']!r}: expected counts and numbers")
        moments = {k for k in tensors if k.startswith("optimizer.")}
        trained = set(params) - model.frozen if opt and (opt.t or moments) else ()    # none before a step
        if moments != {f"optimizer.{mv}.{k}" for mv in "mv" for k in trained}:
            raise ValueError(f"optimizer: expected the moments m and v of its {len(trained)} trainable"
                             f" parameters, got {len(moments)} tensors ({sorted(moments)[:2]}...)")
        if state.rng_state is not None:
            numpy.random.default_rng().bit_generator.state = state.rng_state
    except (KeyError, TypeError, ValueError, OverflowError) as e:   # (an RNG word out of range: OverflowError)
        raise ValueError(f"{path}: corrupt training state ({type(e).__name__}: {e})") from None
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
    names = sorted(n for n in os.listdir(folder) if n.endswith(".tiktoken")) if os.path.isdir(folder) else []
    return os.path.join(folder, "gpt2.tiktoken" if "gpt2.tiktoken" in names else names[0]) if names else None


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
    params = {re.sub(r"^transformer\.", "", k): v for k, v in tensors.items() if not _HF_BUFFER.search(k)}
    if not all(getattr(params.get(k), "ndim", 0) == 2 for k in ("wte.weight", "wpe.weight")):
        raise ValueError(f"{path}: not a GPT-2 checkpoint (no wte.weight/wpe.weight matrices)")
    head = params.pop("lm_head.weight", None)
    if head is not None and not (head.shape == params["wte.weight"].shape
                                 and xp.array_equal(head, params["wte.weight"])):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; llm ties them")
    (V, C), T = params["wte.weight"].shape, params["wpe.weight"].shape[0]
    where, config = "n_head", os.path.join(folder, "config.json")
    if n_head is None and os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                where, n_head = f"{config}: n_head", json.load(f).get("n_head")
        except (ValueError, AttributeError, RecursionError) as e:     # (not UTF-8, not JSON, not an object)
            raise ValueError(f"{config}: expected a JSON object ({type(e).__name__}: {e})") from None
    if n_head is None:
        if C % 64:
            raise ValueError(f"{path}: cannot infer n_head for n_embd={C}; pass n_head"
                             " or put a config.json with n_head beside the file")
        n_head = C // 64
    if not is_count(n_head) or C % n_head:
        raise ValueError(f"{where}: expected a positive integer that divides n_embd={C}, got {n_head!r}")
    n_layer = len({name.split(".")[1] for name in params if name.startswith("h.")})
    try:
        cfg = GPTConfig(n_layer=n_layer, n_head=int(n_head), n_embd=C, block_size=T, vocab_size=V)
    except ValueError as e:                                             # (an empty wte or wpe)
        raise ValueError(f"{path}: {e}") from None
    shapes = param_shapes(cfg)
    missing, extra = set(shapes) - set(params), set(params) - set(shapes)
    if missing or extra:
        raise ValueError(f"{path}: not the GPT-2 layout (missing {sorted(missing)[:5]},"
                         f" unexpected {sorted(extra)[:5]})")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(params[name].shape)}, expected {shape}")
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
    atomic_write(os.path.join(folder, "config.json"), json.dumps(config, indent=2).encode())
    if tokenizer is not None:
        lines = [base64.b64encode(b).decode() + f" {i}\n" for b, i in sorted(tokenizer.ranks.items(),
                                                                          key=lambda kv: kv[1])]
        atomic_write(os.path.join(folder, "tokenizer.tiktoken"), "".join(lines).encode())


# =============================================================================
# 10. Fast kernels: fastops (C on the CPU, CUDA on the GPU)
# =============================================================================
# Everything above is complete in NumPy and calls its layers through `ops`
# (section 2). This section loads fastops.c's kernels (`python build_ext.py`;
# `--cuda` for the GPU's) and puts them in `ops` in the place of the matrix
# products, attention, LayerNorm, GELU, cross-entropy, the embedding's
# backward, AdamW with its sum of squares, and a generated token's whole
# pass in one call (next_logits). Every array is checked before a pointer to it crosses
# into C. LLM_NUMPY=1 in the environment, or set_backend("numpy"), keeps the
# NumPy code everywhere.

def _import(name, path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# How OpenMP's waiting threads wait (OMP_WAIT_POLICY, read when fastops
# loads; a value in the environment wins). Alone on the machine the default
# (spin a while, then sleep) is fastest; beside busy processes, or beside
# OpenBLAS's threads (which spin a while after each of NumPy's products), a
# spinning thread holds a core another needs, so then they sleep at once
# ("passive"). No result changes (README, "Speed: fastops").
def _others_running(proc="/proc") -> float:
    """How many tasks of other processes want a core now: on Linux the
    runnable tasks less this process's own (NumPy's OpenBLAS threads spin for
    a while after it loads), the least of five looks 2 ms apart so that a
    passing task is not counted; elsewhere the load average stands in."""
    try:
        seen = []
        for _ in range(5):
            with open(f"{proc}/loadavg") as f:
                runnable = int(f.read().split()[3].split("/")[0])
            for task in os.listdir(f"{proc}/self/task"):
                with open(f"{proc}/self/task/{task}/stat") as f:
                    runnable -= f.read().rsplit(")", 1)[1].split()[0] == "R"
            seen.append(runnable)
            time.sleep(0.002)
        return min(seen)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]                     # macOS; Windows has none: AttributeError


CALIBRATION = 5       # the calibration's version: a new one whenever _calibration_work changes


def calibration_path(lib: str = None) -> str:
    """The verdicts' file, one per build and version of the calibration: the
    same kernels in every run of it, so that a resumed run repeats the
    uninterrupted one bit for bit."""
    lib = lib or _fastops.__file__
    name = os.path.basename(lib).split(".")[0] + f".calibration-{CALIBRATION}.json"
    return os.path.join(os.path.dirname(lib), name)


def _saved_choice(path: str):
    """The verdicts kept in a calibration file, or None."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _omp_env(lib: str) -> dict:
    """Passive when other processes are busy, or when this build's calibration
    put the products in NumPy, on OpenBLAS's threads (the rest of a step ran 2-28x slower)."""
    numpy_products = not (_saved_choice(calibration_path(lib)) or {}).get("linear", {}).get("use", True)
    try:
        busy = numpy_products or _others_running() >= 0.5 * (os.cpu_count() or 1)
    except (AttributeError, OSError):                  # no way to tell: the safe choice
        busy = True
    return {"OMP_WAIT_POLICY": "passive"} if busy else {}


_OMP_SET_HERE = []                                     # the ones llm.py set (not the user)


# glibc gives freed blocks over 128 KB back to the system, and the next
# step's arrays then fault in fresh pages, every page of every array: keep
# blocks up to 32 MB in the heap, and trim it only past 1 GB free. Results
# are the same; MALLOC_* settings win.
def _glibc_defaults() -> bool:
    """Linux with glibc's malloc, and no MALLOC_* setting in the environment."""
    import platform
    import sys
    return (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and not any(k.startswith("MALLOC_") for k in os.environ))


def _keep_freed_memory():
    if _glibc_defaults():
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)                     # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)                      # M_TRIM_THRESHOLD


_keep_freed_memory()


def _load_fastops():
    if os.environ.get("LLM_NUMPY") == "1":
        return None
    import glob
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        build_ext = _import("build_ext", os.path.join(here, "build_ext.py"))   # names this fastops.c's build
    except OSError:                                    # llm.py alone, without fastops.c beside it
        return None
    path = build_ext.built()
    if path:
        for k, val in _omp_env(path).items():
            if k not in os.environ:
                os.environ[k] = val
                _OMP_SET_HERE.append(k)
        try:
            return _import(build_ext.MODULE, path)
        except ImportError:
            pass                                       # built for another Python
    old = [p for e in (".so", ".pyd") for p in glob.glob(os.path.join(here, "_fastops_*" + e))
           if p != path and not os.path.basename(p).startswith("_fastops_cuda_")]   # CUDA: no sign of a CPU build
    warn(("fastops was built from an older fastops.c" if old else "fastops (the C kernels) is not built")
         + ": using the slower NumPy code. Build it with `python build_ext.py` (or set LLM_NUMPY=1 to silence this).")
    return None


# ---- the GPU: CuPy arrays and fastops.c's CUDA section -----------------------
# use_device("cuda") makes `xp` CuPy (an optional dependency, imported only
# here), so every array -- parameters, activations, gradients, optimizer state
# -- lives on the GPU, and the same code above runs there. The heavy math then
# goes to _fastops_cuda.so (`python build_ext.py --cuda`), opened with cffi's
# ABI mode; its functions take device pointers. Without it CuPy's own math runs.

def _load_cuda():
    if os.environ.get("LLM_NUMPY") == "1":        # asked for: CuPy's own math, as NumPy's on the CPU
        return None
    import cffi
    here = os.path.dirname(os.path.abspath(__file__))
    build_ext = _import("build_ext", os.path.join(here, "build_ext.py"))   # the API, from fastops.c
    path = os.path.join(here, build_ext.CUDA_LIB)
    if not os.path.exists(path):
        warn("fastops' CUDA kernels are not built (for this fastops.c): using CuPy's own math. "
             "Build them with `python build_ext.py --cuda`.")
        return None
    ffi = cffi.FFI()
    ffi.cdef(build_ext.CUDA_CDEF)
    lib = ffi.dlopen(path)
    msg = lib.fo_cuda_sync()            # its CUDA runtime starts (or the driver is too old)
    if msg != ffi.NULL:
        warn(f"fastops' CUDA kernels cannot run here ({ffi.string(msg).decode()}): "
             "using CuPy's own math. Rebuild them with this machine's nvcc.")
        return None
    return types.SimpleNamespace(ffi=ffi, lib=lib)


_fastops = _load_fastops()       # the C kernels, a cffi module (or None)
_cuda = None                     # the CUDA kernels, (ffi, lib), once use_device("cuda") loads them
_chosen = "auto"                 # set_backend's: "auto" (each kernel where it wins here), "fastops", "numpy"
_backend = "numpy"               # what runs: the choice, where the device's kernels are loaded
REFERENCE = dict(vars(ops))      # section 2's NumPy layers


def use_device(name: str):
    """'cpu' (NumPy, the C kernels) or 'cuda' (CuPy, the CUDA kernels). Call
    it before building a model: arrays made earlier stay where they are."""
    global xp, _cuda
    if name == "cpu":
        xp = numpy
    elif name == "cuda":
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("no GPU")
        except Exception as e:
            raise RuntimeError(f"device cuda: needs CuPy and a CUDA GPU ({type(e).__name__}: {e}); "
                               "install CuPy with e.g. `pip install cupy-cuda12x`") from None
        xp, _cuda = cupy, _cuda or _load_cuda()
        if world.size > 1:
            world.start_nccl()
    else:
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {name!r}")
    _install()


def set_backend(name: str) -> str:
    """The heavy math: 'auto' (each kernel where it beats NumPy on this
    machine, the default; NumPy everywhere when none is built), 'fastops'
    (every kernel) or 'numpy'. Returns the previous choice."""
    global _chosen
    if name not in ("auto", "fastops", "numpy"):
        raise ValueError(f"backend: expected 'auto', 'fastops' or 'numpy', got {name!r}")
    if name == "fastops" and (_fastops if xp is numpy else _cuda) is None:
        raise RuntimeError("backend: fastops is not built (run `python build_ext.py`"
                           + ("" if xp is numpy else " --cuda") + ")")
    previous, _chosen = _chosen, name
    _install()
    return previous


def _install():
    """Fill `ops` for the current device and backend."""
    global _backend
    _backend = _chosen if (_fastops if xp is numpy else _cuda) is not None else "numpy"
    vars(ops).update(REFERENCE)
    if xp is not numpy:                  # CuPy spells numpy.add.at cupyx.scatter_add
        import cupyx
        ops.embedding_backward = lambda dwte, idx, dx: (cupyx.scatter_add(dwte, idx, dx), dwte)[1]
    if _backend != "numpy":
        vars(ops).update(FAST)


# ---- checks before C ---------------------------------------------------------

def _f32(name, a, ndim=None, shape=None, allow_transposed=False, strided=False):
    """A float32 array of `ndim` dims (or of `shape`), C-contiguous (copied if
    not; a transposed matrix, Fortran-ordered, passes as is if allowed; with
    strided, on the CPU, any array whose last axis is contiguous and whose
    strides are whole floats, as the kernels count them)."""
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name}: expected a {xp.__name__} array, got {type(a).__name__}")
    if a.dtype != numpy.float32:
        raise TypeError(f"{name}: expected dtype float32, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape}")
    if a.flags.c_contiguous or (allow_transposed and a.flags.f_contiguous) or (
            strided and xp is numpy and a.strides[-1] == 4 and all(s >= 0 and s % 4 == 0 for s in a.strides)):
        return a                                        # (0-d arrays too: ascontiguousarray makes them 1-D)
    return xp.ascontiguousarray(a)


def _f32_inplace(name, a, shape=None):
    """As _f32, but the array itself, updated in place: it must be C-contiguous and writeable already."""
    if isinstance(a, numpy.ndarray) and not (a.flags.c_contiguous and a.flags.writeable):
        raise ValueError(f"{name}: expected a writeable C-contiguous array (updated in place), got a"
                         f" {'read-only' if a.flags.c_contiguous else 'non-contiguous'} one")
    return _f32(name, a, shape=shape)


def _ids(name, a, V, shape=None):
    """Token ids for C: integers in 0..V-1 (of `shape`), as C-ordered int64."""
    t = numpy.asarray(a)
    if t.dtype.kind not in "iu" or (shape is not None and t.shape != shape):
        raise ValueError(f"{name}: expected integer ids{'' if shape is None else f' of shape {shape}'},"
                         f" got shape {t.shape} dtype {t.dtype}")
    if t.size and (int(t.min()) < 0 or int(t.max()) >= V):
        raise ValueError(f"{name}: ids must be in 0..{V - 1}, got {int(t.min())}..{int(t.max())}")
    return numpy.ascontiguousarray(t, dtype=numpy.int64)


def _ids_ptr(t):
    return _fastops.ffi.cast("int64_t *", _fastops.ffi.from_buffer(t))


def _match(name, a, shape, other):
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} to match {other.shape}, got {a.shape}")


def _f32s(*arrays) -> bool:
    return all(isinstance(a, xp.ndarray) and a.dtype == numpy.float32 for a in arrays)


def _kernels():
    """(lib, ffi) of the kernels for the arrays of the current device."""
    m = _fastops if xp is numpy else _cuda
    return m.lib, m.ffi


def _ptr(a):
    if xp is not numpy:                                # a GPU array: its device address
        return _cuda.ffi.cast("float *", int(a.data.ptr))
    if not (a.flags.c_contiguous or a.flags.f_contiguous):   # a strided view: its first element
        return _fastops.ffi.cast("float *", a.__array_interface__["data"][0])
    # a Fortran-ordered matrix is the C-ordered transpose: same memory
    return _fastops.ffi.cast("float *", _fastops.ffi.from_buffer(a if a.flags.c_contiguous else a.T))


def _ptrs(arrays):
    """A C array of pointers to C-ordered arrays on the CPU, for the kernels that take many."""
    ffi = _fastops.ffi
    return ffi.new("float *[]", [ffi.cast("float *", ffi.from_buffer(a)) for a in arrays])


def _strides(a):
    """(row stride, column stride) in elements of a C- or F-contiguous matrix."""
    return (a.shape[1], 1) if a.flags.c_contiguous else (1, a.shape[0])


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


# ---- the kernels, each checked ---------------------------------------------------

def fo_linear_forward(x, w, b):
    """x (M, K) @ w (K, N) + b (N,) -> (M, N)."""
    x = _f32("x", x, 2)
    (M, K), w = x.shape, _f32("w", w, 2, allow_transposed=True)
    N = w.shape[1]
    _match("w", w, (K, N), x)
    b = None if b is None else _f32("b", b, shape=(N,))
    y = xp.empty((M, N), numpy.float32)
    lib, ffi = _kernels()
    lib.fo_sgemm(M, N, K, _ptr(x), K, 1, _ptr(w), *_strides(w), _ptr(y), N, 0, ffi.NULL if b is None else _ptr(b))
    return _done(y)


def fo_linear_backward_input(dy, w):
    """-> dx = dy w^T alone (a frozen weight)."""
    dy = _f32("dy", dy, 2)
    (M, N), w = dy.shape, _f32("w", w, 2, allow_transposed=True)
    K = w.shape[0]
    _match("w", w, (K, N), dy)
    dx = xp.empty((M, K), numpy.float32)
    rs, cs = _strides(w)
    lib, ffi = _kernels()
    lib.fo_sgemm(M, K, N, _ptr(dy), N, 1, _ptr(w), cs, rs, _ptr(dx), K, 0, ffi.NULL)
    return _done(dx)


def fo_linear_backward(dy, x, w):
    """-> dx = dy w^T, dw = x^T dy (in w's layout: a transposed w, the tied
    lm_head's, gets dw^T = dy^T x, made so), db = the column sums of dy."""
    x = _f32("x", x, 2)
    (M, K), w = x.shape, _f32("w", w, 2, allow_transposed=True)
    N = w.shape[1]
    _match("w", w, (K, N), x)
    dy = _f32("dy", dy, shape=(M, N))
    db = xp.empty(N, numpy.float32)
    lib, ffi = _kernels()
    if w.flags.c_contiguous:                                  # (db summed as dy is packed)
        dx, dw = xp.empty((M, K), numpy.float32), xp.empty((K, N), numpy.float32)
        lib.fo_linear_backward(_ptr(dy), _ptr(x), _ptr(w), _ptr(dx), _ptr(dw), _ptr(db), M, K, N)
        return _done(dx, dw, db)
    dx, dw = fo_linear_backward_input(dy, w), xp.empty((N, K), numpy.float32)
    lib.fo_sgemm(N, K, M, _ptr(dy), 1, N, _ptr(x), K, 1, _ptr(dw), K, 0, ffi.NULL)
    lib.fo_colsum(_ptr(dy), _ptr(db), M, N)
    return _done(dx, dw.T, db)


def _heads(names, *arrays, shape=None):
    """(B, H, T, D) float32 arrays for the attention kernels, and their
    element strides (b, h, t), shared: on the CPU as they are when each row
    of D is contiguous and all have the same strides (q, k, v as views of
    c_attn's output), else copied to (B, H, T, D); on the GPU always copied."""
    first = _f32(names[0], arrays[0], 4 if shape is None else None, shape, strided=True)
    arrays = [first] + [_f32(n, a, shape=first.shape, strided=True) for n, a in zip(names[1:], arrays[1:])]
    if xp is not numpy or len({a.strides for a in arrays}) > 1:
        arrays = [xp.ascontiguousarray(a) for a in arrays]
    return arrays, [s // 4 for s in arrays[0].strides[:3]]


def _side_by_side(B, H, T, D):
    """A new (B, H, T, D) array, on the CPU a view of (B, T, H, D): heads side
    by side in each row, as c_proj reads them (on the GPU packed)."""
    if xp is not numpy:
        return xp.empty((B, H, T, D), numpy.float32)
    return xp.empty((B, T, H, D), numpy.float32).transpose(0, 2, 1, 3)


def fo_attention_forward(q, k, v):
    """Causal attention, q, k, v (B, H, T, D) -> y (B, H, T, D), on the CPU
    a view of (B, T, H, D) (heads side by side, as c_proj reads them), and
    each row's log-sum-exp (B, H, T), all the backward needs besides q, k, v, y."""
    (q, k, v), s = _heads("qkv", q, k, v)
    B, H, T, D = q.shape
    y, lse = _side_by_side(B, H, T, D), xp.empty((B, H, T), numpy.float32)
    sy = [st // 4 for st in y.strides[:3]]
    _kernels()[0].fo_attention_forward(_ptr(q), _ptr(k), _ptr(v), _ptr(y), _ptr(lse), B, H, T, D, *s, *sy)
    return _done(y, lse)


def fo_attention_backward(dy, q, k, v, y, lse):
    """-> dq, dk, dv (B, H, T, D) in q's layout: on the CPU, when q, k, v
    are views of c_attn's output (B, T, 3, H, D), views of one such array
    (ops.join_heads then copies nothing); else packed."""
    (q, k, v), s = _heads("qkv", q, k, v)
    B, H, T, D = q.shape
    if xp is numpy and s == [T * 3 * H * D, D, 3 * H * D]:
        g = xp.empty((B, T, 3, H, D), numpy.float32)
        dq, dk, dv = (g[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    else:
        (q, k, v), s = [xp.ascontiguousarray(a) for a in (q, k, v)], [H * T * D, T * D, D]
        dq, dk, dv = (xp.empty(q.shape, numpy.float32) for _ in range(3))
    (y, dy), sy = _heads(("y", "dy"), y, dy, shape=q.shape)
    lse = _f32("lse", lse, shape=q.shape[:3])
    _kernels()[0].fo_attention_backward(_ptr(dy), _ptr(q), _ptr(k), _ptr(v), _ptr(y), _ptr(lse),
                                        _ptr(dq), _ptr(dk), _ptr(dv), *q.shape, *s, *sy)
    return _done(dq, dk, dv)


def fo_attention_decode(q, k, v):
    """Generation's attention (CPU): q (B, H, Tq, D), the last Tq of the Tk
    positions whose keys and values k, v (B, H, Tk, D) the KV cache holds ->
    y (B, H, Tq, D), a view of (B, Tq, H, D), as c_proj reads it."""
    if xp is not numpy:
        raise RuntimeError("fo_attention_decode: a CPU kernel (on the GPU, generation's attention runs in CuPy)")
    (q,), sq = _heads("q", q)
    (k, v), sk = _heads("kv", k, v)
    B, H, Tq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or k.shape[2] < Tq:
        raise ValueError(f"k: expected shape ({B}, {H}, Tk >= {Tq}, {D}) to match q {q.shape}, got {k.shape}")
    y = _side_by_side(B, H, Tq, D)
    _fastops.lib.fo_attention_decode(_ptr(q), _ptr(k), _ptr(v), _ptr(y), B, H, Tq, k.shape[2], D,
                                     *sq, *sk, *[st // 4 for st in y.strides[:3]])
    return _done(y)


def fo_decode_token(model, kv, tokens):
    """Generation (CPU): the logits (B, V) of the token after each of
    tokens (B,), which take the position after the last in the KV cache kv
    (every layer's already there, B rows), the whole model in one call; kv
    grows by it. The same logits, bit for bit, as next_logits with fastops'
    kernels (the weights C-ordered, as the model makes and loads them)."""
    if xp is not numpy:
        raise RuntimeError("fo_decode_token: a CPU kernel")
    cfg, H, past = model.config, model.config.n_head, kv.length
    (V, C), L = model.params["wte.weight"].shape, cfg.n_layer
    tokens = _ids("tokens", tokens, V)
    if tokens.ndim != 1 or not tokens.size:
        raise ValueError(f"tokens: expected a 1-D array of ids, got shape {tokens.shape}")
    if kv.n != [past] * L or not 0 < past < cfg.block_size:
        raise ValueError(f"kv: expected {L} layers of 1..{cfg.block_size - 1} positions, got {kv.n}")
    params = [_f32(name, model.params[name], shape=shape) for name, shape in param_shapes(cfg).items()]
    for i in range(L):
        kv.reserve(i, past + 1)
    B, cap = len(tokens), kv.k[0].shape[2]
    stores = [_f32_inplace("kv", a, shape=(B, H, cap, C // H)) for a in kv.k + kv.v]   # (C-ordered: reserve)
    logits = xp.empty((B, V), numpy.float32)
    _fastops.lib.fo_decode_token(L, C, H, V, B, _ids_ptr(tokens), past, _ptr(params[0]), _ptr(params[1]),
                                 _ptrs(params[2:-2]), _ptr(params[-2]), _ptr(params[-1]), _ptrs(stores[:L]),
                                 _ptrs(stores[L:]), cap, *_strides(params[0].T), _ptr(logits))
    kv.n[:] = [n + 1 for n in kv.n]
    return _done(logits)


def fo_gelu_forward(x):
    x = _f32("x", x)
    y = xp.empty_like(x)
    _kernels()[0].fo_gelu_forward(_ptr(x), _ptr(y), x.size)
    return _done(y)


def fo_gelu_backward(dy, x):
    x = _f32("x", x)
    dy, dx = _f32("dy", dy, shape=x.shape), xp.empty_like(x)
    _kernels()[0].fo_gelu_backward(_ptr(dy), _ptr(x), _ptr(dx), x.size)
    return _done(dx)


def _rows(x):
    """LayerNorm's x (..., C), C >= 1 -> x, its M rows, C."""
    x = _f32("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected shape (..., C) with C >= 1, got {x.shape}")
    return x, x.size // x.shape[-1], x.shape[-1]


def fo_layernorm_forward(x, w, b, eps=1e-5):
    """-> y (like x), and each row's mean and 1/std (M,)."""
    x, M, C = _rows(x)
    w, b = _f32("w", w, shape=(C,)), _f32("b", b, shape=(C,))
    y, mean, rstd = xp.empty_like(x), xp.empty(M, numpy.float32), xp.empty(M, numpy.float32)
    _kernels()[0].fo_layernorm_forward(_ptr(x), _ptr(w), _ptr(b), _ptr(y), _ptr(mean), _ptr(rstd), M, C, float(eps))
    return _done(y, mean, rstd)


def fo_layernorm_backward(dy, x, w, mean, rstd):
    """-> dx (like x), dw, db (C,)."""
    x, M, C = _rows(x)
    dy, w = _f32("dy", dy, shape=x.shape), _f32("w", w, shape=(C,))
    mean, rstd = _f32("mean", mean, shape=(M,)), _f32("rstd", rstd, shape=(M,))
    dx, dw, db = xp.empty_like(x), xp.empty(C, numpy.float32), xp.empty(C, numpy.float32)
    _kernels()[0].fo_layernorm_backward(_ptr(dy), _ptr(x), _ptr(w), _ptr(mean), _ptr(rstd),
                                        _ptr(dx), _ptr(dw), _ptr(db), M, C)
    return _done(dx, dw, db)


# The optimizer in C: the global gradient norm (for clipping) and the AdamW update
# of every parameter, each one multi-threaded pass over all arrays (gscale scales
# the gradients on the fly: AdamW.step's clipping, section 3). On the
# CPU only; they update p, m, v in place, so these must be float32, C-contiguous,
# writeable and of the parameter's shape (no copies).

def fo_grad_sumsq(grads) -> float:
    """Sum of squares of every array in `grads` (a dict or a list), in float64."""
    items = grads.items() if isinstance(grads, dict) else enumerate(grads)
    arrays = [_f32("grads[%r]" % (k,), g) for k, g in items]
    if not arrays:
        return 0.0
    sizes = _fastops.ffi.new("long[]", [a.size for a in arrays])
    return _done(_fastops.lib.fo_sumsq(len(arrays), _ptrs(arrays), sizes))


def fo_adamw_step(params, grads, m, v, decay, lr, betas, eps, weight_decay, t, gscale=1.0):
    """One AdamW step (adamw_update's arithmetic) for every name in `grads`:
    params[name], m[name], v[name] updated in place; decay[name] true for the
    arrays that are weight-decayed; t the step count after this step (for the
    bias corrections); every gradient multiplied by gscale (clipping) first."""
    names, (c1, c2) = list(grads), bias_corrections(betas, t)
    for label, d in (("params", params), ("m", m), ("v", v), ("decay", decay)):
        if missing := [k for k in names if k not in d]:
            raise ValueError(f"{label}: expected an entry for each gradient, missing {missing}")
    ps, gs, ms, vs = [], [], [], []
    for k in names:
        p = _f32_inplace(f"params[{k!r}]", params[k])
        mk, vk = (_f32_inplace(f"{n}[{k!r}]", d[k], p.shape) for n, d in (("m", m), ("v", v)))
        if any(numpy.may_share_memory(a, b) for a, b in ((p, mk), (p, vk), (mk, vk))):
            raise ValueError(f"params[{k!r}], m[{k!r}], v[{k!r}]: expected three arrays, got shared memory"
                             " (each updated in place)")
        g = _f32(f"grads[{k!r}]", grads[k], shape=p.shape)
        overlaps = any(numpy.may_share_memory(g, a) for a in (p, mk, vk))
        ps.append(p), ms.append(mk), vs.append(vk), gs.append(g.copy() if overlaps else g)   # read as it came
    if not names:
        return
    ffi, lib = _fastops.ffi, _fastops.lib
    b1, b2 = betas
    lib.fo_adamw(len(names), _ptrs(ps), _ptrs(gs), _ptrs(ms), _ptrs(vs), ffi.new("long[]", [p.size for p in ps]),
                 ffi.new("int[]", [1 if decay[k] else 0 for k in names]), float(lr), float(b1), float(b2),
                 float(eps), float(weight_decay), float(c1), float(c2), float(gscale))
    _done()


def fo_cross_entropy(logits, targets, weights=None, dscale=1.0):
    """Softmax with cross-entropy in one pass (CPU): logits (M, V), targets
    (M,) integer ids, weights (M,) or None -> (loss (M,), dlogits (M, V)),
    loss[r] = -log softmax(logits[r])[targets[r]],
    dlogits[r] = (softmax(logits[r]) - onehot(targets[r])) * weights[r] * dscale."""
    logits = _f32("logits", logits, 2)
    M, V = logits.shape
    t = _ids("targets", targets, V, shape=(M,))
    weights = None if weights is None else _f32("weights", weights, shape=(M,))
    loss, dlogits = numpy.empty(M, numpy.float32), numpy.empty((M, V), numpy.float32)
    ffi, lib = _fastops.ffi, _fastops.lib
    lib.fo_cross_entropy(_ptr(logits), _ids_ptr(t), ffi.NULL if weights is None else _ptr(weights),
                         _ptr(loss), _ptr(dlogits), float(dscale), M, V)
    return _done(loss, dlogits)


def fo_embedding_backward(dwte, idx, dx):
    """dwte (V, C) += each position's dx (..., C) at the row of its token
    idx (...), in place, as numpy.add.at. -> dwte."""
    dwte = _f32_inplace("dwte", dwte)
    if dwte.ndim != 2:
        raise ValueError(f"dwte: expected a (V, C) array, got shape {dwte.shape}")
    V, C = dwte.shape
    t = _ids("idx", idx, V)                                    # (1-D if idx is 0-d: then dx is (C,))
    dx = _f32("dx", dx, shape=(*numpy.shape(idx), C))
    dx = dx.copy() if numpy.may_share_memory(dx, dwte) else dx         # read as it came, as numpy.add.at does
    _fastops.lib.fo_embedding_backward(_ptr(dwte), _ids_ptr(t), _ptr(dx), t.size, C)
    return _done(dwte)


# ---- the fast layers, for `ops` --------------------------------------------------
# Each is section 2's layer where the kernel applies, and hands the work back
# to the NumPy function where it does not. A cache from a kernel is marked,
# so its backward goes to the kernel too.

class _Kernel(tuple):                     # the cache of a layer that ran in fastops
    pass


def _linear_family(rows):
    """The products by rows: generation's one row (batch 1) and few rows
    (batch 2 to 16, each weight read once for all) win or lose apart."""
    return "linear" if rows > 16 else "linear_one" if rows == 1 else "linear_small"


def _linear_forward(x, w, b):
    if not (_f32s(x, w) and (b is None or _f32s(b)) and _use(_linear_family(len(x)))):
        return linear_forward(x, w, b)
    return fo_linear_forward(x, w, b), _Kernel((x, w))


def _linear_backward(dy, cache, frozen=False):
    if not isinstance(cache, _Kernel):
        return linear_backward(dy, cache, frozen)
    x, w = cache
    return (fo_linear_backward_input(dy, w), None, None) if frozen else fo_linear_backward(dy, x, w)


def _attention_forward(q, k, v, dropout=0.0, rng=None):
    if q.shape[-2] < k.shape[-2]:                                   # generation, with a KV cache
        if xp is numpy and _f32s(q, k, v) and (dropout == 0.0 or rng is None) and _use("decode"):
            return fo_attention_decode(q, k, v), None               # (nothing kept: no backward)
        return attention_forward(q, k, v, dropout, rng)
    # not with dropout; on a GPU the kernel keeps a query's row in registers: heads up to 128 wide
    if not (_f32s(q, k, v) and q.shape == k.shape and (dropout == 0.0 or rng is None)
            and (xp is numpy or q.shape[-1] <= 128) and _use("attention")):
        return attention_forward(q, k, v, dropout, rng)
    (q, k, v), _ = _heads("qkv", q, k, v)                       # (copied, if at all, once)
    y, lse = fo_attention_forward(q, k, v)
    return y, _Kernel((q, k, v, y, lse))


def _attention_backward(dy, cache):
    return fo_attention_backward(dy, *cache) if isinstance(cache, _Kernel) else attention_backward(dy, cache)


def _join_heads(dq, dk, dv):
    # fo_attention_backward writes dq, dk, dv as views of one (B, T, 3, H, D)
    # array: hand that on instead of stacking a copy
    g = dq.base
    views = isinstance(g, numpy.ndarray) and g.ndim == 5 and g.shape[2] == 3 and all(
        d.base is g and d.ctypes.data == g.ctypes.data + i * g.strides[2]
        and d.shape == (g.shape[0], g.shape[3], g.shape[1], g.shape[4])
        and d.strides == (g.strides[0], g.strides[3], g.strides[1], g.strides[4]) for i, d in enumerate((dq, dk, dv)))
    return g if views else join_heads(dq, dk, dv)


def _layernorm_forward(x, w, b, eps=1e-5):
    if not (_f32s(x, w, b) and _use("layernorm")):
        return layernorm_forward(x, w, b, eps)
    x = xp.ascontiguousarray(x)
    y, mean, rstd = fo_layernorm_forward(x, w, b, eps)
    return y, _Kernel((x, w, mean, rstd))


def _layernorm_backward(dy, cache):
    return fo_layernorm_backward(dy, *cache) if isinstance(cache, _Kernel) else layernorm_backward(dy, cache)


def _gelu_forward(x):
    if not (_f32s(x) and _use("gelu")):
        return gelu_forward(x)
    x = xp.ascontiguousarray(x)
    return fo_gelu_forward(x), _Kernel((x,))


def _gelu_backward(dy, cache):
    return fo_gelu_backward(dy, *cache) if isinstance(cache, _Kernel) else gelu_backward(dy, cache)


def _cross_entropy_forward(logits, targets, mask=None):
    if not (xp is numpy and _f32s(logits) and _use("cross_entropy")):
        return cross_entropy_forward(logits, targets, mask)
    (targets, mask), V = check_targets(logits, targets, mask), logits.shape[-1]
    w = numpy.ones(targets.size, numpy.float32) if mask is None else numpy.asarray(mask, numpy.float32).ravel()
    n = max(float(w.sum()), 1.0)
    rows, dlogits = fo_cross_entropy(logits.reshape(-1, V), targets.reshape(-1), w, 1.0 / n)
    return numpy.float32((rows * w).sum() / n), _Kernel((dlogits.reshape(logits.shape),))


def _cross_entropy_backward(cache):
    return cache[0] if isinstance(cache, _Kernel) else cross_entropy_backward(cache)


def _embedding_backward(dwte, idx, dx):
    if not (xp is numpy and _f32s(dwte, dx) and dwte.flags.c_contiguous and _use("embedding")):
        return embedding_backward(dwte, idx, dx)
    return fo_embedding_backward(dwte, idx, dx)


def _next_logits(model, ids, kv):
    # one new token of each row, after a prompt: the whole model in one call
    # (not with attention maps kept, LoRA adapters beside their weights, or dropout)
    cfg, ids = model.config, numpy.asarray(ids)
    if not (xp is numpy and ids.ndim == 2 and ids.shape[1] == 1 and kv.maps is None
            and len(kv.n) == cfg.n_layer and kv.k[0].shape[0] == len(ids) and 0 < kv.length < cfg.block_size
            and not model.lora and (cfg.dropout == 0 or model.rng is None)
            and model.params["wte.weight"].dtype == numpy.float32 and _use("decode_token")):
        return next_logits(model, ids, kv)
    return fo_decode_token(model, kv, check_ids(ids, cfg.vocab_size, "idx")[:, 0])


def _on_cpu(arrays):                 # the optimizer's kernels: float32 NumPy arrays (a 0-d one too)
    return xp is numpy and all(isinstance(a, (numpy.ndarray, numpy.float32)) and a.dtype == numpy.float32
                               for a in arrays)


def _adamw_update(params, grads, m, v, lr, betas, eps, weight_decay, t, gscale=1.0):
    if not (_on_cpu([*grads.values()] + [params[k] for k in grads]) and _use("adamw")):
        return adamw_update(params, grads, m, v, lr, betas, eps, weight_decay, t, gscale)
    fo_adamw_step(params, {k: numpy.asarray(g) for k, g in grads.items()}, m, v,
                  {k: params[k].ndim >= 2 for k in grads}, lr, betas, eps, weight_decay, t, gscale)


def _sum_of_squares(arrays):
    arrays = list(arrays)
    return (fo_grad_sumsq([numpy.asarray(a) for a in arrays]) if _on_cpu(arrays) and _use("adamw")
            else sum_of_squares(arrays))


# ---- where each kernel is used: measured, once per build ---------------------
# With the 'auto' backend a kernel runs only where it beats NumPy on this
# machine: on an Apple M-series Mac, NumPy multiplies matrices on Accelerate,
# faster than fastops' portable kernel. Each family of kernels is timed
# against its NumPy function once, forward and backward on shapes of the
# models here, and the verdict is kept beside the library (calibration_path;
# delete the file, or set LLM_CALIBRATE=1, to measure again). The products
# are timed amid the work around them, not alone: OpenBLAS's spinning threads
# slow the kernels after each product (timed alone, one row's products tied).
# bench.py and the report card show the verdicts. On a GPU every kernel runs.

def _calibration_work():
    """Family -> the work that times it. On a GPT 768 wide (227 MB of
    weights, read from memory as GPT-2's): 16 rows in generation, one row's
    products where they run, in tokens through the layers one op at a time,
    and tokens at batch 1 and 16 in one call (decode_token), each after a
    prompt of 8; the products in a training step of a small GPT of the
    default width."""
    r = numpy.random.default_rng(0)
    f32 = lambda *shape: r.standard_normal(shape).astype(numpy.float32)
    layer = lambda name, *a: lambda: getattr(ops, name + "_backward")(a[0], getattr(ops, name + "_forward")(*a)[1])
    params = {f"p{i}": f32(*s) for i, s in enumerate([(512, 192), (192, 576), (192, 768), (768, 192), (192,)])}
    grads = {k: f32(*v.shape) for k, v in params.items()}
    m, v = {k: numpy.zeros_like(p) for k, p in params.items()}, {k: numpy.ones_like(p) for k, p in params.items()}
    model = GPT(GPTConfig(n_layer=2, n_head=6, n_embd=192, block_size=64, vocab_size=512), seed=0)
    ids = r.integers(0, 512, (8, 65))
    gen = GPT(GPTConfig(n_layer=8, n_head=12, n_embd=768, block_size=64, vocab_size=512), seed=0)

    def generation(rows, tokens, prompt=1, step=None):   # a prompt, then one token at a time, with the KV cache
        step = step or ops.next_logits                        # (next_logits: the layers one op at a time)
        kv = KVCache()
        step(gen, [list(range(prompt))] * rows, kv)
        for t in range(tokens):
            step(gen, [[t]] * rows, kv)
    return {"linear_one": [lambda: generation(1, 3, prompt=8, step=next_logits)],
            "linear_small": [lambda: generation(16, 1)],
            "attention": [layer("attention", *(f32(12, 4, 64, 32),) * 3), layer("attention", *(f32(2, 6, 128, 64),) * 3)],
            "decode": [lambda q=f32(16, 6, 1, 32), kv=f32(16, 6, 48, 32): ops.attention_forward(q, kv, kv)],
            "layernorm": [layer("layernorm", f32(2048, 384), f32(384), f32(384))],
            "gelu": [layer("gelu", f32(768, 512)), layer("gelu", f32(512, 1536))],
            "cross_entropy": [lambda z=f32(12, 64, 260), t=r.integers(0, 260, (12, 64)):
                              ops.cross_entropy_forward(z, t)],
            "embedding": [lambda d=f32(1844, 192), t=r.integers(0, 1844, (16, 64)), dx=f32(16, 64, 192):
                          ops.embedding_backward(d, t, dx)],
            "adamw": [lambda: (ops.sum_of_squares(grads.values()),
                               ops.adamw_update(params, grads, m, v, 1e-4, (0.9, 0.99), 1e-8, 0.1, 1))],
            "decode_token": [lambda: generation(1, 3, prompt=8), lambda: generation(16, 3, prompt=8)],
            "linear": [lambda: (model.forward(ids[:, :-1], ids[:, 1:]), model.backward())]}   # last: a step


def calibrate() -> dict:
    """Family -> {"fastops": s, "numpy": s, "use": bool}: the best of five
    blocks of runs per backend, taken in turn, a fastops block after a pause;
    "step" is the training step so chosen against it all in NumPy, which wins
    where it is faster."""
    global _chosen, _CHOICE
    saved, result = (_chosen, _CHOICE), {}
    try:
        for family, runs in _calibration_work().items():
            arms = ("fastops", "numpy", "all numpy") if family == "linear" else ("fastops", "numpy")
            t = dict.fromkeys(arms, math.inf)
            for rep in range(5):
                for arm in arms:                            # this family on `arm`, the others as chosen
                    _chosen, _CHOICE = "auto", ({"step": {"use": False}} if arm == "all numpy"
                                                else {**result, family: {"use": arm == "fastops"}})
                    _install()
                    if arm == "fastops":
                        time.sleep(0.2)
                    t0 = time.perf_counter()
                    while time.perf_counter() - t0 < 0.02:  # warm-up: after a pause the cores take
                        for f in runs:                      # a few ms to come back to speed
                            f()
                    t0 = time.perf_counter()
                    for _ in range(3):
                        for f in runs:
                            f()
                    t[arm] = min(t[arm], (time.perf_counter() - t0) / 3)
            result[family] = {"fastops": t["fastops"], "numpy": t["numpy"], "use": t["fastops"] < t["numpy"]}
            if family == "linear":                          # the last: the step as chosen, against all NumPy
                chosen = min(t["fastops"], t["numpy"])
                result["step"] = {"fastops": chosen, "numpy": t["all numpy"], "use": chosen < t["all numpy"]}
    finally:
        _chosen, _CHOICE = saved
        _install()
    return result


_CHOICE = None                   # calibrate()'s verdicts, read or measured at first use
FAMILIES = ("linear", "linear_one", "linear_small", "attention", "decode", "layernorm", "gelu", "cross_entropy",
            "embedding", "adamw", "decode_token")


def kernel_choice(say=None) -> dict:
    """Which kernels the 'auto' backend uses here (measured once per build,
    about 30 s: say(message) first, where given); {} without fastops."""
    global _CHOICE
    if _fastops is None:
        return {}
    if _CHOICE is None:
        path = calibration_path()
        _CHOICE = None if os.environ.get("LLM_CALIBRATE") == "1" else _saved_choice(path)
        if _CHOICE is None or not set(FAMILIES) <= set(_CHOICE):     # a file from before a family
            if say:
                say("fastops: timing each kernel against NumPy on this machine, once for this build (about 30 s) ...")
            _CHOICE = calibrate()
            try:
                atomic_write(path, json.dumps(_CHOICE, indent=1).encode())
            except OSError:
                pass                                        # a read-only install: measured each run
    return _CHOICE


def _use(family) -> bool:
    if _backend == "fastops" or xp is not numpy:
        return True
    choice = kernel_choice()
    return choice.get("step", {}).get("use", True) and choice.get(family, {}).get("use", True)


def kernels_in_use() -> dict:
    """Family -> "fastops" or "numpy": what runs now (bench.py and the report card say it)."""
    return {f: "fastops" if _backend != "numpy" and _use(f) else "numpy" for f in FAMILIES}


FAST = {f.__name__[1:]: f for f in (_linear_forward, _linear_backward, _attention_forward, _attention_backward,
                                   _join_heads, _layernorm_forward, _layernorm_backward, _gelu_forward,
                                   _gelu_backward, _cross_entropy_forward, _cross_entropy_backward,
                                   _embedding_backward, _adamw_update, _sum_of_squares, _next_logits)}
_install()


# ---- several processes: data parallelism over MPI --------------------------------
# `mpirun -n N python train.py` starts N copies of the program, ranks 0 to
# N-1, on one machine or several. `world` is what they share: train_steps
# sums their gradients with world.allreduce (section 5, where data
# parallelism is explained); estimate_loss, PPO and the held-out answers split
# their work with world.map; rank 0 alone writes files. Without mpirun the
# world is this one process, its methods return at once, and mpi4py (an
# optional dependency) is never imported. MPI waits for ever for a rank that
# died or hangs: a watchdog stops every rank, saying why, once a collective
# call has waited LLM_MPI_TIMEOUT seconds (300). On GPUs NCCL sums the
# gradients where CuPy has it (never run here).

class RanksDiffer(ValueError):
    """Raised on every rank alike when the ranks are not running the same thing."""


class World:
    def __init__(self):
        launched = int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or 1)
        self.rank, self.size, self.nccl, self.waiting = 0, 1, None, None
        if launched > 1:
            timeout = os.environ.get("LLM_MPI_TIMEOUT", "300")
            try:
                self.timeout = float(timeout)
            except ValueError:
                self.timeout = math.nan
            if not 1 <= self.timeout < math.inf:
                raise RuntimeError(f"LLM_MPI_TIMEOUT: expected seconds, a number >= 1, got {timeout!r}")
            try:
                from mpi4py import MPI
            except ImportError:
                raise RuntimeError(f"started as one of {launched} ranks (by mpirun), but mpi4py is not"
                                   " installed: `pip install mpi4py` (or start one process, without mpirun)") from None
            import sys
            import threading
            self.MPI, self.comm, self.stderr = MPI, MPI.COMM_WORLD, sys.stderr
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
            threading.Thread(target=self._watchdog, daemon=True).start()
            hook = sys.excepthook            # an uncaught error on one rank stops them all
            sys.excepthook = lambda *error: (hook(*error), self.fail(code=1))

    def _watchdog(self):
        while True:
            time.sleep(1.0)                  # rank 0 says it first, if it can
            if self.waiting and time.time() > self.waiting + (10 if self.rank else 0):
                self.fail(f"llm: rank {self.rank} of {self.size} waited {self.timeout:g} s (LLM_MPI_TIMEOUT) for"
                          " the other ranks: one of them died or hangs; stopping every rank")

    def _call(self, f, *args):
        """A collective call, f(*args), under the watchdog (it blocks without the GIL)."""
        self.waiting = time.time() + self.timeout
        try:
            return f(*args)
        finally:
            self.waiting = None

    def fail(self, message="", code=1):
        """Stop every rank (MPI_Abort), after writing the message on stderr."""
        self.stderr.write(message + "\n" * bool(message))
        self.stderr.flush()
        self.comm.Abort(code)

    def allreduce(self, grads: dict, *numbers) -> list:
        """Sum grads (name -> array, in place) and the numbers over the ranks -> the numbers' sums."""
        if self.size == 1:
            return list(numbers)
        if grads:                            # one buffer, one call: the arrays side by side
            flat = xp.concatenate([xp.ravel(g) for g in grads.values()])
            if self.nccl is not None:
                from cupy.cuda import nccl
                kind, stream = nccl.NCCL_FLOAT32 if flat.dtype == numpy.float32 else nccl.NCCL_FLOAT64, \
                    xp.cuda.get_current_stream()
                self.nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, kind, nccl.NCCL_SUM, stream.ptr)
                self._call(stream.synchronize)
            else:
                host = to_numpy(flat)        # on the CPU, flat itself
                self._call(self.comm.Allreduce, self.MPI.IN_PLACE, host, self.MPI.SUM)
                flat = xp.asarray(host)
            at = 0
            for k, g in grads.items():
                grads[k] = flat[at:at + math.prod(xp.shape(g))].reshape(xp.shape(g))
                at += math.prod(xp.shape(g))
        sums = numpy.array(numbers, numpy.float64)
        self._call(self.comm.Allreduce, self.MPI.IN_PLACE, sums, self.MPI.SUM)
        return [float(s) for s in sums]

    def map(self, fn, items, rng=None):
        """fn(items[, rng]) -> one result per item (a list, or a tuple of
        lists). Each rank runs fn on its share (every size-th item) and gets
        the whole, in order. With rng each samples from its own generator,
        seeded by one draw from rng, so that rng stays the same on every rank."""
        if self.size == 1:
            return fn(items) if rng is None else fn(items, rng)
        mine = items[self.rank::self.size]
        parts = self.allgather(fn(mine) if rng is None else
                               fn(mine, numpy.random.default_rng([int(rng.integers(2 ** 63)), self.rank])))
        whole = lambda lists: [lists[i % self.size][i // self.size] for i in range(len(items))]
        return tuple(map(whole, zip(*parts))) if isinstance(parts[0], tuple) else whole(parts)

    def allgather(self, value) -> list:
        return [value] if self.size == 1 else self._call(self.comm.allgather, value)

    def barrier(self):
        self.allgather(None)

    def agree(self, **values):
        """Raise RanksDiffer unless every rank has the same values."""
        first, *others = self.allgather(values)
        for rank, theirs in enumerate(others, 1):
            for k, v in theirs.items():
                if v != first.get(k):
                    raise RanksDiffer(f"the ranks differ: {k} is {v} on rank {rank} but {first.get(k)} on rank 0"
                                      " (every rank must run the same command on the same code and data)")

    def check(self, model, state, tc, batch_fn, rng):
        """Before training: RanksDiffer unless every rank has the same
        settings, step, weights, kernels and first batch (the same data)."""
        if self.size > 1:
            probe = numpy.random.default_rng()
            probe.bit_generator.state = rng.bit_generator.state
            digest = lambda arrays: hashlib.sha256(b"".join(to_numpy(a).tobytes() for a in arrays)).hexdigest()[:16]
            self.agree(**{"the training settings": asdict(tc), "the step": state.step, "the kernels": kernels_in_use(),
                          "the weights' sha256": digest(model.params[k] for k in sorted(model.params)),
                          "the first batch's sha256 (the data)": digest(batch_fn(probe))})

    def start_nccl(self):
        """GPUs: each rank takes one of its machine's, and NCCL sums if CuPy has it (else MPI, by the host)."""
        import cupy
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED).Get_rank()
        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()
        try:
            from cupy.cuda import nccl
        except ImportError:
            return
        uid = self._call(self.comm.bcast, nccl.get_unique_id() if self.rank == 0 else None)
        self.nccl = self._call(nccl.NcclCommunicator, self.size, uid, self.rank)


world = World()
if world.size > 1 and _fastops is not None:    # the same kernels on every rank: rank 0's calibration
    _CHOICE = world._call(world.comm.bcast, kernel_choice() if world.rank == 0 else None)
