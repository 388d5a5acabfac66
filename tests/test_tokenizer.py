"""The tokenizer (llm.py section 1): byte-pair training learns the vocabulary
asked for, deterministically, without merging across chunks; encode and
decode round-trip any string (hypothesis), encoding merges as the
rescanning definition does (of equal pairs, the leftmost first), the byte
tokenizer is UTF-8's bytes, bad input (a lone surrogate, out-of-range ids,
malformed files, a special id that is a token's) is a clear error and
invalid UTF-8 decodes to U+FFFD; special tokens only when allowed (even a
text that is one's spelling alone); save and load; and, when ../shared/data
holds GPT-2's vocabulary, GPT-2's exact ids and tinyshakespeare's token
count."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llm
from helpers import shared_file

SAMPLE = ("The capital of France is Paris. Paris is lovely in spring; isn't it? "
          "Numbers 1234 and 56, tabs\tand  double  spaces.\n\nÜmlaut café naïve — 日本語 テキスト 😀 "
          "they're we'll I'd you've she's ") * 20


@pytest.fixture(scope="module")
def tok():
    return llm.Tokenizer.train(SAMPLE, 350)


def test_training_learns_the_requested_vocabulary(tok):
    assert tok.vocab_size == 350
    assert len(tok.ranks) == 350 - len(llm.SPECIAL_TOKENS)
    # frequent words become single tokens
    assert len(tok.encode(" Paris")) == 1
    assert len(tok.encode("The capital")) < len("The capital".encode())


def test_training_is_deterministic(tok):
    again = llm.Tokenizer.train(SAMPLE, 350)
    assert again.ranks == tok.ranks and again.special == tok.special


def naive_bpe(text, n_merges):
    """Byte-pair training as its definition says: count every pair anew
    before each merge, merge the most frequent (ties: the smaller pair)."""
    words = [list(c.encode()) for c in llm.re.findall(llm.GPT2_SPLIT, text)]
    pieces = [bytes([i]) for i in range(256)]
    for _ in range(n_merges):
        counts = {}
        for w in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        pieces.append(pieces[best[0]] + pieces[best[1]])
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                two = i + 1 < len(w) and (w[i], w[i + 1]) == best
                out.append(len(pieces) - 1 if two else w[i])
                i += 2 if two else 1
            words[k] = out
    return pieces


@settings(deadline=None, max_examples=60)
@given(text=st.text(st.sampled_from("ab cd\n"), min_size=100, max_size=400), n_merges=st.integers(0, 40))
def test_training_makes_the_merges_of_the_definition(text, n_merges):
    """The incremental counts (each merge updates only the words it touches)
    give the merges of recounting everything each time."""
    tok = llm.Tokenizer.train(text, 256 + len(llm.SPECIAL_TOKENS) + n_merges)
    assert sorted(tok.ranks, key=tok.ranks.get) == naive_bpe(text, n_merges)


def naive_encode(tok, chunk: bytes) -> list:
    """Encoding as its definition says: rescan every adjacent pair, merge the
    lowest-ranked (ties: the leftmost), until no pair is a token."""
    parts = [chunk[i:i + 1] for i in range(len(chunk))]
    while True:
        found = [(tok.ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in tok.ranks]
        if not found:
            return [tok.ranks[p] for p in parts]
        i = min(found)[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


@settings(deadline=None, max_examples=300)
@given(chunk=st.binary(max_size=60) | st.text(st.sampled_from("Paris ae"), max_size=80).map(str.encode))
def test_encoding_merges_as_the_definition_says(tok, chunk):
    """The merges kept in a heap (a long unbroken word took quadratic time:
    21,000 letters 13 s) give the rescanning definition's tokens."""
    tok._cache.clear()
    assert tok._bpe(chunk) == naive_encode(tok, chunk)


# Equal ranks compete only within runs ("aaa" holds the pair "aa" twice,
# overlapping): SAMPLE's tokenizer has no such token, this one has many.
RUNS = llm.Tokenizer.train(" ".join("a" * n for n in range(1, 30)) + " "
                           + " ".join("ab" * n + "a" for n in range(1, 15)) + " " + "x" * 40, 290)


@settings(deadline=None, max_examples=300)
@given(chunk=st.lists(st.tuples(st.sampled_from(["a", "ab", "x", " "]), st.integers(1, 20)), max_size=4)
       .map(lambda runs: "".join(s * n for s, n in runs).encode()))
def test_encoding_breaks_ties_leftmost_as_the_definition_says(chunk):
    """Runs, where two overlapping pairs have the same rank: the leftmost
    merges first, as in the rescanning definition."""
    RUNS._cache.clear()
    assert RUNS._bpe(chunk) == naive_encode(RUNS, chunk)


def test_equal_ranks_merge_the_leftmost_pair_first():
    t = llm.Tokenizer({**BYTES, b"aa": 256}, {})
    assert t.encode("aaa") == [256, 97] and t.encode("aaaaa") == [256, 256, 97]


def test_merges_never_cross_chunk_boundaries(tok):
    for b in tok.ranks:
        s = b.decode("utf-8", errors="ignore")
        # a token is never a word glued to the space of the next word
        assert not (len(s) > 1 and s.endswith(" ") and s.strip()), repr(s)


def test_too_small_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        llm.Tokenizer.train("abc", 100)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_any_string(tok, s):
    assert tok.decode(tok.encode(s)) == s


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=20))
def test_byte_tokenizer_roundtrip(s):
    t = llm.byte_tokenizer()
    ids = t.encode(s)
    assert ids == list(s.encode("utf-8")) and t.decode(ids) == s


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("ok \ud800 not ok")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 349), max_size=50))
def test_decode_accepts_any_in_range_ids(tok, ids):
    s = tok.decode(ids)
    assert isinstance(s, str)


def test_invalid_utf8_becomes_replacement_char(tok):
    # 0xE6 alone is the first byte of a 3-byte character
    assert tok.decode([0xE6, ord("a")]) == "\ufffda"


@given(st.integers(350, 10**6) | st.integers(-10**6, -1))
def test_out_of_range_ids_are_a_clear_error(tok, bad):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([1, bad])


def test_special_tokens_only_when_allowed(tok):
    text = f"hi{llm.ENDOFTEXT}there"
    plain = tok.encode(text)
    assert tok.special[llm.ENDOFTEXT] not in plain
    assert tok.decode(plain) == text
    allowed = tok.encode(text, allow_special=True)
    assert tok.special[llm.ENDOFTEXT] in allowed
    assert tok.decode(allowed) == text
    assert all(i not in tok.special.values() for i in tok.encode(SAMPLE))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_a_special_tokens_spelling_alone_is_ordinary_text_unless_allowed(tok, data):
    """The spelling of a special token, alone or among other text, encodes
    as ordinary text (and decodes back to it) unless allow_special; with it,
    a special token alone is exactly its id."""
    specials = sorted(tok.special)
    pieces = data.draw(st.lists(st.sampled_from(specials) | st.text(max_size=4), min_size=1, max_size=4))
    text = "".join(pieces)
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special.values()) and tok.decode(plain) == text
    for s in specials:
        plain = tok.encode(s)
        assert not set(plain) & set(tok.special.values()) and tok.decode(plain) == s
        assert tok.encode(s, allow_special=True) == [tok.special[s]]


def test_save_and_load(tok, tmp_path):
    p = tmp_path / "tok.json"
    tok.save(str(p))
    again = llm.Tokenizer.load(str(p))
    assert again.ranks == tok.ranks and again.special == tok.special
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert p.read_text().startswith("{")         # human-readable JSON
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="bad.json"):
        llm.Tokenizer.load(str(bad))


def test_malformed_tiktoken_line_names_file_and_line(tmp_path):
    p = tmp_path / "x.tiktoken"
    p.write_text("IQ== 0\nnot-base64 oops extra\n")
    with pytest.raises(ValueError, match=r"x.tiktoken:2"):
        llm.Tokenizer.from_tiktoken(str(p))


@pytest.fixture(scope="module")
def gpt2():
    return llm.Tokenizer.from_tiktoken(shared_file("gpt2.tiktoken"))


def test_gpt2_exact_ids(gpt2):
    assert gpt2.encode("Hello world, this is GPT-2!") == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 0]
    assert gpt2.special[llm.ENDOFTEXT] == 50256
    assert gpt2.encode(llm.ENDOFTEXT, allow_special=True) == [50256]


def test_gpt2_merges_the_leftmost_of_equal_pairs(gpt2):
    """Five "=" hold the pair "==" four times: tiktoken's ids are those of
    "====" then "=", the leftmost pairs merged first."""
    assert gpt2.encode("=====") == [1421, 28]


def test_gpt2_tinyshakespeare_token_count(gpt2):
    with open(shared_file("tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    ids = gpt2.encode(text)
    assert len(ids) == 338_025
    assert gpt2.decode(ids) == text


BYTES = {bytes([i]): i for i in range(256)}


@pytest.mark.parametrize("ranks,special,pattern,match", [
    ({**BYTES, b"ab": 255}, {}, llm.GPT2_SPLIT, "ranks"),                      # an id twice
    ({**BYTES, b"ab": -1}, {}, llm.GPT2_SPLIT, "ranks"),
    ({**BYTES, b"ab": 10**20}, {}, llm.GPT2_SPLIT, "ranks"),
    ({**BYTES, b"ab": 257}, {}, llm.GPT2_SPLIT, "ranks"),                      # a gap (was KeyError when saved)
    ({**BYTES, b"ab": 256.0}, {}, llm.GPT2_SPLIT, "ranks"),
    ({**BYTES, "ab": 256}, {}, llm.GPT2_SPLIT, "ranks"),                       # text, not bytes
    ({b: i - 1 for b, i in BYTES.items() if i} | {b"ab": 255}, {}, llm.GPT2_SPLIT, "single byte"),   # encode: KeyError
    (BYTES, {"<|x|>": "256"}, llm.GPT2_SPLIT, "special"),
    (BYTES, {"<|x|>": 256.0}, llm.GPT2_SPLIT, "special"),
    (BYTES, {"<|x|>": True}, llm.GPT2_SPLIT, "special"),
    (BYTES, {"<|x|>": 65}, llm.GPT2_SPLIT, "special"),                         # an ordinary token's id
    ({**BYTES, b"ab": 256}, {"<|x|>": 256}, llm.GPT2_SPLIT, "special"),         # a merged token's id
    (BYTES, {"<|x|>": 256, "<|y|>": 256}, llm.GPT2_SPLIT, "special"),
    (BYTES, {"": 256}, llm.GPT2_SPLIT, "special"),
    (BYTES, {}, "", "pattern"),
    (BYTES, {}, r"(\w+)|\s+", "pattern"),                                     # findall: the groups, text lost
    (BYTES, {}, "(", "pattern"),                                                # was re.error
    (BYTES, {}, b"\\w+", "pattern"),
], ids=["twice", "negative", "huge", "gap", "float", "text", "no-byte-0", "special-text", "special-float",
        "special-bool", "special-taken", "special-merged", "special-twice", "special-unnamed", "pattern-empty",
        "pattern-group", "pattern-broken", "pattern-bytes"])
def test_a_malformed_vocabulary_is_refused(ranks, special, pattern, match):
    with pytest.raises(ValueError, match=match):
        llm.Tokenizer(ranks, special, pattern)


def test_malformed_tokenizer_files_name_the_file(tok, tmp_path):
    good = json.loads(tok.to_json())
    bad = tmp_path / "bad.json"
    for edit in ({"tokens": good["tokens"][:-1] + good["tokens"][-2:-1]},      # a token twice
                 {"tokens": good["tokens"][1:]}, {"special": {"<|end|>": "349"}},
                 {"special": {"<|end|>": 3}}, {"pattern": "("}, {"pattern": "(a)|."}):
        bad.write_text(json.dumps({**good, **edit}))
        with pytest.raises(ValueError, match="bad.json"):
            llm.Tokenizer.load(str(bad))
    for content in (b"[" * 100000 + b"]" * 100000, b'{"format": "\xff"}'):     # RecursionError, UnicodeDecodeError
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="bad.json"):
            llm.Tokenizer.load(str(bad))
    p = tmp_path / "x.tiktoken"
    p.write_text("".join(f"{__import__('base64').b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
                 + "YWI= 255\n")                                               # a rank twice
    with pytest.raises(ValueError, match="x.tiktoken: ranks"):
        llm.Tokenizer.from_tiktoken(str(p))


@pytest.mark.parametrize("bad", [65.9, 65.0, True, np.bool_(True), "65", None])
def test_decode_refuses_ids_that_are_not_integers(tok, bad):
    with pytest.raises(TypeError, match="ids: expected integer token ids"):    # 65.9 was 'A'
        tok.decode([66, bad])
    assert tok.decode([np.int64(65), np.int32(66), 67]) == "ABC"
