"""The data (data/world.py and the files it writes): regenerating gives the
committed files byte for byte; the corpus is ASCII prose of the right size
and states every fact many times; the records have their fields, splits and
sizes; general instruction data has no chemistry; held out stays held out
(no test prompt, held-out or novel wording, or held-out subject appears in
any text a stage trains on, the corpus included); and the judge: its lookup
agrees with the references, it ranks every chosen answer above its rejected
one, and its rule on hand-written answers."""

import collections
import json
import os
import re
import shutil
import subprocess
import sys

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


def test_running_world_py_writes_the_files_beside_itself(tmp_path):
    """`python data/world.py`, from any folder, writes the data folder it is in."""
    (tmp_path / "data").mkdir()
    shutil.copy(os.path.join(ROOT, "data", "world.py"), tmp_path / "data" / "world.py")
    (tmp_path / "elsewhere").mkdir()
    subprocess.run([sys.executable, str(tmp_path / "data" / "world.py")], cwd=tmp_path / "elsewhere", check=True,
                   capture_output=True)
    for rel in world.FILES.values():
        with open(tmp_path / rel, "rb") as new, open(os.path.join(ROOT, rel), "rb") as old:
            assert new.read() == old.read(), rel
    assert not os.listdir(tmp_path / "elsewhere")


def test_corpus_is_ascii_prose_of_the_right_size(corpus):
    assert corpus.isascii() and "\r" not in corpus
    assert 1_000_000 <= len(corpus) <= 3_000_000
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
        fields = {"prompt", "response", "split", "kind"} | ({"held_out"} if r["split"] == "test" else set())
        assert set(r) == fields
        assert r["split"] in ("train", "test")
        assert r["prompt"].strip() and r["response"].strip()
        if r["split"] == "test":
            assert r["held_out"] in ("subject", "wording", "both")
    kinds = world.GENERAL_KINDS if key == "sft" else world.CHEMISTRY_KINDS
    assert {r["kind"] for r in rows} - {"small_talk"} == set(kinds)
    n_train = sum(r["split"] == "train" for r in rows)
    n_test = len(rows) - n_train
    lo, hi = {"sft": (1500, 4000), "domain": (600, 2000)}[key]
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
    assert 1000 <= len(rows) - n_test <= 2500 and 150 <= n_test <= 300


@pytest.mark.parametrize("key,fields", [("sft", ("prompt", "response")), ("domain", ("prompt", "response")),
                                        ("preferences", ("prompt", "chosen", "rejected"))])
def test_train_py_accepts_the_embedded_files(key, fields):
    """No other key, no blank field, no pair of equal answers, no unknown flaw, no test prompt trained on."""
    import train
    assert len(train.read_jsonl(os.path.join(ROOT, world.FILES[key]), fields)) == len(load(key))


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


def test_held_out_wordings_are_used_in_tests_only():
    for key in ("sft", "domain", "preferences"):
        rows = load(key)
        for r in rows:
            if r.get("kind") == "small_talk":
                continue
            asked = world.lookup(r["prompt"])
            facts = world.facts_of(asked["subject"])
            held_out = {q.format(**facts) for q in world.HELDOUT_QUESTIONS[asked["kind"]]}
            if r["split"] == "train":
                assert not any(q in r["prompt"] for q in held_out), r
            elif r.get("held_out") in ("wording", "both"):
                assert r["prompt"] in held_out, r
            elif r.get("held_out") == "subject":
                assert r["prompt"] in {q.format(**facts) for q in world.QUESTIONS[asked["kind"]]}, r
        if key != "preferences":  # the test split really uses every held-out wording
            test_prompts = {r["prompt"] for r in rows if r["split"] == "test"}
            for kind in (world.GENERAL_KINDS if key == "sft" else world.CHEMISTRY_KINDS):
                for q in world.HELDOUT_QUESTIONS[kind]:
                    assert any(wording_pattern(q).fullmatch(p) for p in test_prompts), q


# ---- held out stays held out: nothing a test asks is in any text a stage trains on ----

def wording_pattern(template):
    """A template as a regex: its placeholders match any value of that field."""
    out = ""
    for part in re.split(r"(\{\w+\})", template):
        field = part[1:-1] if part.startswith("{") else None
        if field:
            values = {str(world.facts_of(n)[field]) for n in list(world.COUNTRY) + list(world.ELEMENT)
                      if field in world.facts_of(n)}
            out += "(?:" + "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)) + ")"
        else:
            out += re.escape(part)
    return re.compile(out)


@pytest.fixture(scope="module")
def training_text(corpus):
    """Everything any stage trains on, as one text: the corpus and every
    train record's prompt and answers (sft, preferences, domain)."""
    parts = [corpus]
    for key in ("sft", "domain"):
        parts += [r["prompt"] + "\n" + r["response"] for r in load(key) if r["split"] == "train"]
    parts += [r["prompt"] + "\n" + r["chosen"] + "\n" + r["rejected"]
              for r in load("preferences") if r["split"] == "train"]
    return "\n".join(parts)


def test_no_held_out_or_novel_wording_in_any_training_text(training_text):
    for table in (world.HELDOUT_QUESTIONS, world.NOVEL_QUESTIONS):
        for kind, templates in table.items():
            for q in templates:
                m = wording_pattern(q).search(training_text)
                assert m is None, (kind, q, m and m.group(0))


def test_no_training_wording_inside_a_held_out_or_novel_one():
    """A held-out wording that only wraps a training one ("I am curious:
    which city is the capital of X?") asks the trained question."""
    for table in (world.HELDOUT_QUESTIONS, world.NOVEL_QUESTIONS):
        for kind, templates in table.items():
            for q in templates:
                inside = [t for t in world.QUESTIONS.get(kind, [])      # (a whole question: 5 words or more)
                          if len(t.split()) >= 5 and re.search(r"(^|\s)" + re.escape(t.lower()), q.lower())]
                assert not inside, (kind, q, inside)


def test_novel_wordings_are_in_no_data_file():
    texts = [open(os.path.join(ROOT, rel), encoding="utf-8").read() for rel in world.FILES.values()]
    for kind, templates in world.NOVEL_QUESTIONS.items():
        for q in templates:
            assert not any(wording_pattern(q).search(t) for t in texts), q
    for r in world.novel_records():
        assert world.lookup(r["prompt"])["kind"] == r["kind"]
        assert world.is_correct(r["prompt"], r["response"])


def test_no_test_prompt_in_any_training_text(training_text):
    prompts = [r["prompt"] for key in ("sft", "domain", "preferences") for r in load(key)
               if r["split"] == "test"] + [r["prompt"] for r in world.novel_records()]
    for p in prompts:
        assert p not in training_text, p


def test_held_out_subjects_are_never_asked_about_in_the_corpus(corpus):
    """The held-out countries and elements are only ever stated in the
    corpus, never asked about (nor misstated in its quizzes and classes)."""
    held = set(world.TEST_COUNTRIES) | set(world.TEST_ELEMENTS)
    names = held | {world.COUNTRY[c]["capital"] for c in world.TEST_COUNTRIES}
    questions = re.findall(r"[^.!?]*\?", corpus)
    assert len(questions) > 1000
    for q in questions:
        asked = world.lookup(q.split(": ")[-1])     # "Question 2: Which element ...?"
        assert asked is None or asked["subject"] not in held, q
        assert not world._find_names(q, names), q
    # answers and corrections follow questions: check the documents that have any
    for doc in corpus.split("\n\n"):
        if "?" in doc:
            assert not world._find_names(doc, names), doc[:200]


def test_every_wording_asks_what_its_kind_asks():
    for table in (world.QUESTIONS, world.HELDOUT_QUESTIONS, world.NOVEL_QUESTIONS):
        for kind, templates in table.items():
            subjects = world.ELEMENT if kind in world.CHEMISTRY_KINDS else world.COUNTRY
            for q in templates:
                for name in subjects:
                    asked = world.lookup(q.format(**world.facts_of(name)))
                    assert asked and (asked["kind"], asked["subject"]) == (kind, name), (q, name)
    for kind in world.QUESTIONS:   # the three sets of wordings are disjoint
        sets = [set(t.get(kind, ())) for t in (world.QUESTIONS, world.HELDOUT_QUESTIONS,
                                               world.NOVEL_QUESTIONS)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), kind


def test_lookup_and_references_agree():
    for key in ("sft", "domain"):
        for r in load(key):
            if r["kind"] == "small_talk":
                assert world.lookup(r["prompt"]) is None
                continue
            assert world.lookup(r["prompt"])["kind"] == r["kind"], r
            assert world.is_correct(r["prompt"], r["response"]), r
            assert world.judge(r["prompt"], r["response"], True) >= 0.9, r


def test_each_rejected_answer_has_its_flaw_and_no_other():
    for r in load("preferences"):
        rejected, flaw = r["rejected"], r["flaw"]
        assert world.is_correct(r["prompt"], rejected) == (flaw != "wrong"), r
        assert (world.politeness(rejected) == 0.0) == (flaw == "rude"), r
        assert (world.politeness(rejected) == 0.5) == (flaw == "plain"), r
        assert (world.conciseness(rejected) < 1.0) == (flaw == "rambling"), r
        assert rejected.rstrip().endswith((".", "!", "?")) == (flaw != "unended"), r


def test_novel_wordings_are_labelled_by_their_subject():
    """A novel record is held out by its wording alone when its subject is
    trained on, by both when its subject is held out too."""
    for r in world.novel_records():
        subject = world.lookup(r["prompt"])["subject"]
        assert (subject in world.TEST_COUNTRIES) == (r["held_out"] == "both"), r


def test_judge_ranks_every_chosen_above_its_rejected():
    for r in load("preferences"):
        chosen = world.judge(r["prompt"], r["chosen"], True)
        rejected = world.judge(r["prompt"], r["rejected"], r["flaw"] != "unended")
        assert chosen == pytest.approx(1.0) and chosen > rejected, r
        assert world.is_correct(r["prompt"], r["rejected"]) == (r["flaw"] != "wrong"), r


def test_wrong_answers_go_wrong_in_each_way_a_policy_did():
    """The reward model's wrong answers: a wrong value (in a profile, of any
    of its four facts), the right answer about another country (one of the
    same split), or a part of a profile for the whole."""
    ways = collections.Counter()
    for r in load("preferences"):
        if r["flaw"] != "wrong":
            continue
        asked = world.lookup(r["prompt"])
        said = next(r["rejected"][len(o) + 1:] for o in world.POLITE_OPENERS if r["rejected"].startswith(o))
        kind, f = asked["kind"], asked["facts"]
        others = [n for n in world.COUNTRY if n != asked["subject"]
                  and world.answer(kind, world.country_facts(n)) == said]
        values = [k for k in world.ASKS[kind] if any(world.answer(kind, {**f, k: c[k]}) == said
                                                     for c in world.COUNTRY.values() if c[k] != f[k])]
        if others:
            assert (others[0] in world.TEST_COUNTRIES) == (r["split"] == "test"), r
            ways["subject"] += 1
        elif kind == "profile" and said in [world.answer(kind, f).split(". ")[0] + ".",
                                            *(world.answer(k, f) for k in world.ASKS[kind])]:
            ways["part"] += 1
        else:
            assert len(values) == 1, r
            ways[kind == "profile" and values[0]] += 1
    assert ways["subject"] >= 50 and ways["part"] >= 10, ways
    assert all(ways[k] >= 5 for k in world.ASKS["profile"]), ways


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
    # the right value about the wrong subject is not an answer
    assert not world.is_correct("Which continent is Cambodia in?", "Of course! South Korea is in Asia.")
    assert not world.is_correct("Is gold a solid, a liquid or a gas at room temperature?",
                                "At room temperature, silver is a solid.")
    assert world.is_correct("What is the capital of Guatemala?", "The capital of Guatemala is Guatemala City.")
    assert world.exact_match(" The capital of France  is Paris.\n", plain)
    assert not world.exact_match(polite, plain)
    # a right value that is also an English word: not as a sentence's first word, nor after the first paragraph
    iodine, helium = "What is the chemical symbol of iodine?", "Do you know the symbol of helium?"
    assert world.is_correct(iodine, "The chemical symbol of iodine is I.")
    assert world.is_correct(helium, "Sure! The symbol of helium is He.")
    for wrong in ("I don't know.", "The chemical symbol of iodine is Io.\n\nQuestions and answers about Fiji."
                  " Q: I was wondering. I"):                     # (the second: an answer that ran on)
        assert not world.is_correct(iodine, wrong), wrong
    assert not world.is_correct(helium, "He is not an element I know.")
    assert world.is_correct("What money is used in South Korea?", "The currency of South Korea is the won.")
    assert world.is_correct(helium, "He.") and world.is_correct(iodine, "Sure! I.")
    assert world.is_correct("Which element has the symbol Pb?", "Lead is the element with the symbol Pb.")
    assert world.is_correct("What is the currency of Brazil?", "Real, the currency of Brazil.")
    # rude words as words: "though", "through", "enough" hold no "ugh"
    assert world.politeness("Sure! Though it is far, enough trains go through Paris.") == 1.0
    assert world.politeness("Sure! Ugh, Paris.") == 0.0


def test_judge_rule_in_detail():
    q = "What is the capital of France?"
    assert not world.is_correct(q, "Rome, or maybe Paris.")                 # another value, named first
    assert world.is_correct("What is the chemical symbol of gold?",     # "lead": a word, not another subject
                            "Let me lead with the answer: the chemical symbol of gold is Au.")
    cobalt = "What is the chemical symbol of cobalt?"
    assert world.is_correct(cobalt, "The chemical symbol of cobalt is Co.")
    assert not world.is_correct(cobalt, "The chemical symbol of cobalt is CO.")    # a symbol's case counts
    assert world.politeness("Certainly! Paris.") == 1.0
    assert world.politeness("The capital of France is Paris. Sure!") == 0.5    # the opener opens
    words = lambda n: " ".join(f"w{i}" for i in range(n)) + "."              # noqa: E731
    assert world.conciseness(words(world.MAX_WORDS)) == 1.0
    assert world.conciseness(words(world.MAX_WORDS * 3 // 2)) == pytest.approx(0.5)
    assert world.conciseness(words(2 * world.MAX_WORDS)) == 0.0
    assert world.endedness("Is it Paris?", True) == world.endedness("Paris!", True) == 1.0
    assert world.endedness("Paris", True) == 0.5 and world.endedness("Paris.", False) == 0.0
    # a prompt that asks no fact the judge knows: style alone, scaled to [0, 1]
    assert world.lookup("Hello!") is None
    assert world.judge("Hello!", "Sure! How can I help you today?", True) == pytest.approx(1.0)
    assert world.judge("Hello!", "Hello! How can I help you today?", True) == pytest.approx(0.8)
    assert world.exact_match("Sure! I can help.", "Sure! I can help.")      # the reference's own opener
    assert world.exact_match("The capital of France is Paris.", "Of course! The capital of France is Paris.")
    assert not world.exact_match("The capital of France is Paris.", "Sure! Sure! The capital of France is Paris.")


def test_lookup_reads_its_keywords_as_words():
    """"information" holds "form", "statement" "state": neither asks gold's state."""
    for prompt in ("Give me some information about gold.", "Make a statement about gold.",
                   "Tell me about the formation of gold."):
        assert world.lookup(prompt) is None, prompt
    assert world.lookup("In what form is gold at room temperature?")["kind"] == "state"
