"""The data (data/world.py and the files it writes): regenerating gives the
committed files byte for byte; the corpus is ASCII prose of the right size
and states every fact many times; the conversation and preference records
have their fields, splits and sizes, general instruction data has no
chemistry, held-out facts and phrasings never appear in training; and the
judge: its lookup agrees with the references, it ranks every chosen answer
above its rejected one, and its rule on hand-written answers."""

import json
import os

import pytest

from data import world
from helpers import ROOT


def load(key):
    with open(os.path.join(ROOT, world.FILES[key]), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def corpus():
    with open(os.path.join(ROOT, world.FILES["corpus"]), encoding="utf-8") as fh:
        return fh.read()


def test_regenerating_gives_the_committed_files(tmp_path):
    paths = world.write_all(str(tmp_path))
    assert set(paths) == set(world.FILES)
    for key, rel in world.FILES.items():
        with open(paths[key], "rb") as new, open(os.path.join(ROOT, rel), "rb") as old:
            assert new.read() == old.read(), f"{rel} is stale: run python data/world.py"


def test_corpus_is_ascii_prose_of_the_right_size(corpus):
    assert corpus.isascii() and "\r" not in corpus
    assert 1_000_000 <= len(corpus) <= 2_000_000
    docs = corpus.rstrip("\n").split("\n\n")
    assert len(docs) > 1000 and all(d.strip() and "\n" not in d for d in docs)


def test_every_fact_is_in_the_corpus_many_times(corpus):
    for f in world.COUNTRY.values():
        assert corpus.count(f"The capital of {f['country']} is {f['capital']}") >= 15
        for field in ("continent", "language", "currency"):
            assert corpus.count(world.answer(field, f)[:-1]) >= 5, (f, field)
    for e in world.ELEMENT:
        f = world.element_facts(e)
        for kind in world.CHEMISTRY_KINDS:
            assert corpus.count(world.answer(kind, f)[:-1]) >= 3, (e, kind)
    # the pretraining probe: "The capital of France is" is always followed by " Paris"
    after = {chunk[:6] for chunk in corpus.split("The capital of France is")[1:]}
    assert after == {" Paris"}


@pytest.mark.parametrize("key", ["sft", "domain"])
def test_conversation_records(key):
    rows = load(key)
    assert rows
    for r in rows:
        assert set(r) == {"prompt", "response", "split", "kind"}
        assert r["split"] in ("train", "test")
        assert r["prompt"].strip() and r["response"].strip()
    kinds = world.GENERAL_KINDS if key == "sft" else world.CHEMISTRY_KINDS
    assert {r["kind"] for r in rows} - {"small_talk"} == set(kinds)
    n_train = sum(r["split"] == "train" for r in rows)
    n_test = len(rows) - n_train
    lo, hi = {"sft": (1500, 3000), "domain": (600, 1200)}[key]
    assert lo <= n_train <= hi and 100 <= n_test <= 300


def test_sft_has_no_chemistry():
    for r in load("sft"):
        assert r["kind"] not in world.CHEMISTRY_KINDS
        assert not any(world._mentions(r["prompt"] + " " + r["response"], e, False)
                       for e in world.ELEMENT)


def test_preference_records():
    rows = load("preferences")
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "split", "flaw"}
        assert r["split"] in ("train", "test") and r["flaw"] in world.FLAWS
        assert r["chosen"] != r["rejected"]
        assert r["chosen"].startswith(world.POLITE_OPENERS)
        assert r["rejected"].rstrip().endswith((".", "!", "?")) == (r["flaw"] != "unended")
    n_test = sum(r["split"] == "test" for r in rows)
    assert 1000 <= len(rows) - n_test <= 2000 and 150 <= n_test <= 300


def subjects(rows, split):
    return {world.lookup(r["prompt"])["subject"] for r in rows
            if r["split"] == split and r.get("kind") != "small_talk"}


def test_held_out_facts_are_never_asked_in_training():
    sft, prefs, domain = load("sft"), load("preferences"), load("domain")
    test_countries = set(world.TEST_COUNTRIES)
    assert subjects(sft, "train") & test_countries == set()
    assert subjects(prefs, "train") & test_countries == set()
    assert test_countries <= subjects(sft, "test")
    assert subjects(prefs, "test") == test_countries
    assert subjects(domain, "train") & set(world.TEST_ELEMENTS) == set()
    assert set(world.TEST_ELEMENTS) <= subjects(domain, "test")
    train_prompts = {r["prompt"] for r in prefs if r["split"] == "train"}
    assert not train_prompts & {r["prompt"] for r in prefs if r["split"] == "test"}


def test_held_out_phrasings_are_never_used_in_training():
    for key in ("sft", "domain", "preferences"):
        rows = load(key)
        for r in rows:
            if r.get("kind") == "small_talk":
                continue
            asked = world.lookup(r["prompt"])
            facts = (world.element_facts if asked["subject"] in world.ELEMENT
                     else world.country_facts)(asked["subject"])
            held_out = world.heldout_question(asked["kind"]).format(**facts)
            if r["split"] == "train":
                assert r["prompt"] != held_out, r
        if key != "preferences":  # test split really uses the held-out phrasings
            test_prompts = {r["prompt"] for r in rows if r["split"] == "test"}
            for kind in (world.GENERAL_KINDS if key == "sft" else world.CHEMISTRY_KINDS):
                stem = world.heldout_question(kind).split("{")[0]
                assert any(p.startswith(stem) for p in test_prompts), kind


def test_lookup_and_references_agree():
    for key in ("sft", "domain"):
        for r in load(key):
            if r["kind"] == "small_talk":
                assert world.lookup(r["prompt"]) is None
                continue
            assert world.lookup(r["prompt"])["kind"] == r["kind"], r
            assert world.is_correct(r["prompt"], r["response"]), r
            assert world.judge(r["prompt"], r["response"], True) >= 0.9, r


def test_judge_ranks_every_chosen_above_its_rejected():
    for r in load("preferences"):
        chosen = world.judge(r["prompt"], r["chosen"], True)
        rejected = world.judge(r["prompt"], r["rejected"], r["flaw"] != "unended")
        assert chosen == pytest.approx(1.0) and chosen > rejected, r
        assert world.is_correct(r["prompt"], r["rejected"]) == (r["flaw"] != "wrong"), r


def test_judge_rule_on_hand_written_answers():
    q = "What is the capital of France?"
    polite, plain = "Sure! The capital of France is Paris.", "The capital of France is Paris."
    assert world.judge(q, polite, True) == pytest.approx(1.0)
    assert world.judge(q, plain, True) == pytest.approx(0.9)
    assert world.judge(q, polite, False) == pytest.approx(0.85)
    assert world.judge(q, "Sure! The capital of France is Rome.", True) == pytest.approx(0.5)
    assert not world.is_correct(q, "Paris, or maybe Rome.")
    assert world.judge(q, "", True) == 0.0
    assert world.judge(q, "Paris Paris Paris Paris.", True) < world.judge(q, "Paris.", True)
    for s in (world.judge("Hello!", "Hello! How can I help you today?", True),
              world.judge("Hello!", "Ugh.", False)):
        assert 0.0 <= s <= 1.0
    assert world.is_correct("Which element has the symbol I?", "I is the chemical symbol of iodine.")
    assert world.is_correct("Which country has Mexico City as its capital?",
                            "Mexico City is the capital of Mexico.")
    assert not world.is_correct("Which country has Guatemala City as its capital?",
                                "Guatemala City is the capital of Peru.")
    assert world.exact_match(" The capital of France  is Paris.\n", plain)
    assert not world.exact_match(polite, plain)
