"""The small, true world the model learns about -- and the judge of answers about it.

Run `python data/world.py` from the project root to (re)write the data files.
The output is deterministic: the same bytes every time (fixed seed, sorted
iteration, one JSON object per line with sorted keys, "\\n" line endings).

Files (paths relative to the project root; see FILES)
------------------------------------------------------
data/corpus.txt         Pretraining text. Plain ASCII prose; documents are
                        separated by one blank line. Every fact in the tables
                        below is stated dozens of times in varied phrasings.
                        As on the web, questions about the facts are asked and
                        answered in many wordings (FAQ pages, forum threads,
                        quizzes, a class whose teacher says whether an answer
                        is right), but only about the training countries and
                        elements, and only in training wordings.
data/sft.jsonl          Instruction conversations, one JSON object per line:
                        {"prompt": str, "response": str,
                         "split": "train" | "test", "kind": str,
                         "held_out": "subject" | "wording" | "both" (test only)}
                        Responses are short, plain, canonical sentences (one
                        per fact and question kind), e.g.
                        "The capital of France is Paris." General domain only
                        (countries); no chemistry. The test split is held out
                        by subject (countries never asked about in any
                        training file: their facts are only stated in the
                        corpus), by wording (HELDOUT_QUESTIONS, used in no
                        training file), or both.
data/preferences.jsonl  Preference pairs, one JSON object per line:
                        {"prompt": str, "chosen": str, "rejected": str,
                         "split": "train" | "test", "flaw": str}
                        chosen = a polite opener + the correct plain answer,
                        e.g. "Sure! The capital of France is Paris."
                        rejected = the same with exactly one flaw:
                        "wrong" (a wrong value of a fact asked for, the
                        answer about another country, or a part of a
                        profile for the whole), "rude" (rude words, no polite
                        opener), "rambling" (repeated or padded sentences),
                        "unended" (runs on and is cut off: the trainer must
                        NOT append the end-of-turn token to these; it appends
                        it to every chosen answer and every other rejected),
                        "plain" (correct, but without the polite opener).
                        Test pairs are about the held-out countries only.
data/domain.jsonl       Task fine-tuning (chemistry), same fields as sft.jsonl,
                        e.g. "What is the chemical symbol of gold?" ->
                        "The chemical symbol of gold is Au." Held out by
                        element and by wording.

novel_records() gives questions in wordings that no file uses
(NOVEL_QUESTIONS): train.py asks them of the instruction-tuned and RLHF
models, which must answer questions however they are put.

The style RLHF should teach: most SFT answers to fact questions are plain;
the preferred answers add one polite opener ("Sure!", "Of course!",
"Certainly!"). One SFT training answer in POLITE_EVERY (and a few small-talk
replies, "Can you help me?" -> "Sure! ...") has such an opener, so the
instruction-tuned policy sometimes samples one and PPO can reinforce it;
greedy answers stay plain until RLHF. SFT test answers are all plain.

The judge
---------
judge(prompt, answer, ended) -> float in [0, 1] scores any answer by the rule
the preference pairs were built from:

    0.50 * correct   the fact the prompt asks for is stated, no wrong one is
    0.20 * polite    1 polite opener, 0.5 plain, 0 rude words present
    0.15 * concise   1 no repeated sentence/phrase and <= MAX_WORDS words,
                     shrinking to 0 at 2 * MAX_WORDS; 0 if anything repeats
    0.15 * ended     1 ended (end-of-turn emitted) after . ! or ?,
                     0.5 ended without final punctuation, 0 not ended

If the prompt asks for no fact the judge knows, only style counts (the last
three terms, rescaled to [0, 1]). Also: is_correct(prompt, answer),
exact_match(reference, answer), lookup(prompt).
"""

import functools
import json
import os
import random
import re
import sys

SEED = 1234
CORPUS_BYTES = 2_400_000  # stop adding corpus documents past this size

FILES = {
    "corpus": "data/corpus.txt",
    "sft": "data/sft.jsonl",
    "preferences": "data/preferences.jsonl",
    "domain": "data/domain.jsonl",
}

# ---------------------------------------------------------------------------
# Fact tables. Plain ASCII spellings (Bogota, Brasilia) for a byte tokenizer.
# ---------------------------------------------------------------------------

# (country, capital, continent, main language, currency)
COUNTRIES = [
    # Europe
    ("France", "Paris", "Europe", "French", "euro"),
    ("Germany", "Berlin", "Europe", "German", "euro"),
    ("Italy", "Rome", "Europe", "Italian", "euro"),
    ("Spain", "Madrid", "Europe", "Spanish", "euro"),
    ("Portugal", "Lisbon", "Europe", "Portuguese", "euro"),
    ("Greece", "Athens", "Europe", "Greek", "euro"),
    ("Poland", "Warsaw", "Europe", "Polish", "zloty"),
    ("Sweden", "Stockholm", "Europe", "Swedish", "krona"),
    ("Norway", "Oslo", "Europe", "Norwegian", "krone"),
    ("Denmark", "Copenhagen", "Europe", "Danish", "krone"),
    ("Finland", "Helsinki", "Europe", "Finnish", "euro"),
    ("Austria", "Vienna", "Europe", "German", "euro"),
    ("Ireland", "Dublin", "Europe", "English", "euro"),
    ("Hungary", "Budapest", "Europe", "Hungarian", "forint"),
    ("Romania", "Bucharest", "Europe", "Romanian", "leu"),
    ("Ukraine", "Kyiv", "Europe", "Ukrainian", "hryvnia"),
    ("Czechia", "Prague", "Europe", "Czech", "koruna"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic", "krona"),
    ("Croatia", "Zagreb", "Europe", "Croatian", "euro"),
    ("Serbia", "Belgrade", "Europe", "Serbian", "dinar"),
    # Asia
    ("Japan", "Tokyo", "Asia", "Japanese", "yen"),
    ("China", "Beijing", "Asia", "Chinese", "yuan"),
    ("India", "New Delhi", "Asia", "Hindi", "rupee"),
    ("South Korea", "Seoul", "Asia", "Korean", "won"),
    ("Thailand", "Bangkok", "Asia", "Thai", "baht"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese", "dong"),
    ("Malaysia", "Kuala Lumpur", "Asia", "Malay", "ringgit"),
    ("Pakistan", "Islamabad", "Asia", "Urdu", "rupee"),
    ("Bangladesh", "Dhaka", "Asia", "Bengali", "taka"),
    ("Nepal", "Kathmandu", "Asia", "Nepali", "rupee"),
    ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian", "tugrik"),
    ("Iran", "Tehran", "Asia", "Persian", "rial"),
    ("Saudi Arabia", "Riyadh", "Asia", "Arabic", "riyal"),
    ("Cambodia", "Phnom Penh", "Asia", "Khmer", "riel"),
    # Africa
    ("Egypt", "Cairo", "Africa", "Arabic", "pound"),
    ("Kenya", "Nairobi", "Africa", "Swahili", "shilling"),
    ("Nigeria", "Abuja", "Africa", "English", "naira"),
    ("Ghana", "Accra", "Africa", "English", "cedi"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic", "birr"),
    ("Morocco", "Rabat", "Africa", "Arabic", "dirham"),
    ("Tanzania", "Dodoma", "Africa", "Swahili", "shilling"),
    ("Senegal", "Dakar", "Africa", "French", "CFA franc"),
    ("Algeria", "Algiers", "Africa", "Arabic", "dinar"),
    ("Angola", "Luanda", "Africa", "Portuguese", "kwanza"),
    ("Zambia", "Lusaka", "Africa", "English", "kwacha"),
    # North America
    ("Canada", "Ottawa", "North America", "English", "dollar"),
    ("Mexico", "Mexico City", "North America", "Spanish", "peso"),
    ("Cuba", "Havana", "North America", "Spanish", "peso"),
    ("Jamaica", "Kingston", "North America", "English", "dollar"),
    ("Guatemala", "Guatemala City", "North America", "Spanish", "quetzal"),
    ("Costa Rica", "San Jose", "North America", "Spanish", "colon"),
    # South America
    ("Brazil", "Brasilia", "South America", "Portuguese", "real"),
    ("Argentina", "Buenos Aires", "South America", "Spanish", "peso"),
    ("Chile", "Santiago", "South America", "Spanish", "peso"),
    ("Peru", "Lima", "South America", "Spanish", "sol"),
    ("Colombia", "Bogota", "South America", "Spanish", "peso"),
    ("Venezuela", "Caracas", "South America", "Spanish", "bolivar"),
    ("Uruguay", "Montevideo", "South America", "Spanish", "peso"),
    # Oceania
    ("Australia", "Canberra", "Oceania", "English", "dollar"),
    ("New Zealand", "Wellington", "Oceania", "English", "dollar"),
    ("Papua New Guinea", "Port Moresby", "Oceania", "English", "kina"),
    ("Fiji", "Suva", "Oceania", "English", "dollar"),
]

# (element, symbol, atomic number, state at room temperature)
ELEMENTS = [
    ("hydrogen", "H", 1, "gas"),
    ("helium", "He", 2, "gas"),
    ("lithium", "Li", 3, "solid"),
    ("beryllium", "Be", 4, "solid"),
    ("boron", "B", 5, "solid"),
    ("carbon", "C", 6, "solid"),
    ("nitrogen", "N", 7, "gas"),
    ("oxygen", "O", 8, "gas"),
    ("fluorine", "F", 9, "gas"),
    ("neon", "Ne", 10, "gas"),
    ("sodium", "Na", 11, "solid"),
    ("magnesium", "Mg", 12, "solid"),
    ("aluminium", "Al", 13, "solid"),
    ("silicon", "Si", 14, "solid"),
    ("phosphorus", "P", 15, "solid"),
    ("sulfur", "S", 16, "solid"),
    ("chlorine", "Cl", 17, "gas"),
    ("argon", "Ar", 18, "gas"),
    ("potassium", "K", 19, "solid"),
    ("calcium", "Ca", 20, "solid"),
    ("titanium", "Ti", 22, "solid"),
    ("chromium", "Cr", 24, "solid"),
    ("manganese", "Mn", 25, "solid"),
    ("iron", "Fe", 26, "solid"),
    ("cobalt", "Co", 27, "solid"),
    ("nickel", "Ni", 28, "solid"),
    ("copper", "Cu", 29, "solid"),
    ("zinc", "Zn", 30, "solid"),
    ("arsenic", "As", 33, "solid"),
    ("bromine", "Br", 35, "liquid"),
    ("krypton", "Kr", 36, "gas"),
    ("rubidium", "Rb", 37, "solid"),
    ("strontium", "Sr", 38, "solid"),
    ("silver", "Ag", 47, "solid"),
    ("tin", "Sn", 50, "solid"),
    ("iodine", "I", 53, "solid"),
    ("xenon", "Xe", 54, "gas"),
    ("caesium", "Cs", 55, "solid"),
    ("barium", "Ba", 56, "solid"),
    ("tungsten", "W", 74, "solid"),
    ("platinum", "Pt", 78, "solid"),
    ("gold", "Au", 79, "solid"),
    ("mercury", "Hg", 80, "liquid"),
    ("lead", "Pb", 82, "solid"),
    ("radon", "Rn", 86, "gas"),
    ("uranium", "U", 92, "solid"),
]

COUNTRY = {row[0]: dict(zip(("country", "capital", "continent", "language", "currency"), row))
           for row in COUNTRIES}
ELEMENT = {row[0]: dict(zip(("element", "symbol", "number", "state"), row)) for row in ELEMENTS}

# Held out by fact: no training file ever asks about these countries/elements
# (their facts are still in the corpus). Chosen once, by a seeded shuffle.
def _pick_test(names, k, keep, seed):
    pool = sorted(n for n in names if n not in keep)
    random.Random(seed).shuffle(pool)
    return tuple(sorted(pool[:k]))


TEST_COUNTRIES = _pick_test(COUNTRY, 9, keep={"France"}, seed=SEED + 1)
TEST_ELEMENTS = _pick_test(ELEMENT, 8, keep={"gold", "oxygen"}, seed=SEED + 2)
TRAIN_SUBJECTS = frozenset(n for n in list(COUNTRY) + list(ELEMENT)
                           if n not in TEST_COUNTRIES and n not in TEST_ELEMENTS)

# ---------------------------------------------------------------------------
# Question wordings. Each kind has three disjoint sets of templates:
#   QUESTIONS          training wordings: the corpus's questions and answers,
#                      sft.jsonl / domain.jsonl / preferences.jsonl train splits
#   HELDOUT_QUESTIONS  held out by wording: used only in the test splits
#   NOVEL_QUESTIONS    used by no data file at all: novel_records() asks them,
#                      so the instruction-tuned and RLHF models are measured on
#                      wordings nobody wrote down for them (general kinds only)
# tests/test_data.py checks that no held-out or novel wording occurs in any
# text a stage trains on, the corpus included.
# ---------------------------------------------------------------------------

QUESTIONS = {
    "capital": [
        "What is the capital of {country}?",
        "Tell me the capital of {country}.",
        "Name the capital of {country}.",
        "What is the capital city of {country}?",
        "Which city is the capital of {country}?",
        "Do you know the capital of {country}?",
        "What city is the capital of {country}?",
        "What is {country}'s capital?",
        "Which city is {country}'s capital?",
        "I need the capital of {country}.",
        "Capital of {country}?",
        "What is the name of the capital of {country}?",
        "Which city is the capital and seat of government of {country}?",
        "What do people call the capital of {country}?",
        "Could you tell me which city is the capital of {country}?",
    ],
    "continent": [
        "Which continent is {country} in?",
        "What continent is {country} on?",
        "On which continent is {country}?",
        "Tell me the continent of {country}.",
        "Name the continent where {country} is.",
        "Do you know which continent {country} is in?",
        "In which continent is {country}?",
        "Which continent does {country} belong to?",
        "What continent is {country} part of?",
        "Where is {country}? Which continent?",
        "Which continent is {country} located in?",
        "In what part of the world is {country}? Tell me the continent.",
        "Which continent would I visit if I went to {country}?",
        "Where can I find {country}? Which continent?",
        "Where does {country} lie? Name the continent.",
        "{country} belongs to which continent?",
        "{country}: which continent is it on?",
    ],
    "language": [
        "What language do people speak in {country}?",
        "Which language is spoken in {country}?",
        "What is the main language of {country}?",
        "Tell me the language of {country}.",
        "Name the language people speak in {country}.",
        "Do you know what language people speak in {country}?",
        "What language is spoken in {country}?",
        "What do people in {country} speak?",
        "Which language do they speak in {country}?",
        "What is the language of {country}?",
        "Which language do people use in {country}?",
        "What language would I hear on a visit to {country}?",
        "Which language do people talk in {country}?",
        "When I travel to {country}, which language do people speak there?",
        "What language should I learn for {country}?",
        "If I go to {country}, which language do people speak?",
        "What language will people speak to me in {country}?",
    ],
    "currency": [
        "What is the currency of {country}?",
        "Which currency is used in {country}?",
        "What money do people use in {country}?",
        "Tell me the currency of {country}.",
        "Name the currency of {country}.",
        "Do you know the currency of {country}?",
        "What is the money of {country} called?",
        "What currency does {country} use?",
        "Which money is used in {country}?",
        "What is the currency used in {country}?",
        "Which currency do I need in {country}?",
        "How do people pay in {country}? Which currency?",
        "What do you pay with in {country}?",
        "What currency would I use on a trip to {country}?",
        "Which money should I take to {country}?",
        "What money do shops in {country} accept?",
        "When I go to {country}, what money do I bring?",
        "What do people use to pay in {country}?",
        "If I visit {country}, which currency do I need?",
        "Which currency do shops in {country} take?",
    ],
    "country_of_capital": [
        "{capital} is the capital of which country?",
        "Which country has {capital} as its capital?",
        "Which country is {capital} the capital of?",
        "Tell me which country has the capital {capital}.",
        "Name the country whose capital is {capital}.",
        "Do you know which country has the capital {capital}?",
        "Of which country is {capital} the capital?",
        "Which country's capital is {capital}?",
        "In which country is the city {capital}?",
        "{capital} is in which country?",
        "Which nation's capital is {capital}?",
        "The government of which country sits in {capital}?",
        "{capital} is the capital of what country?",
        "In which nation is {capital} the capital?",
        "Which country does {capital} serve as the capital of?",
        "{capital} is the capital city of which country?",
        "I am writing from {capital}. Which country am I in?",
    ],
    "profile": [
        "Tell me about {country}.",
        "Describe {country}.",
        "What do you know about {country}?",
        "Give me some facts about {country}.",
        "Tell me a few facts about {country}.",
        "Describe the country {country}.",
        "What can you tell me about {country}?",
        "Give me an overview of {country}.",
        "I want to learn about {country}.",
        "Tell me something about {country}.",
        "Give me a profile of {country}.",
        "Please write about {country}.",
        "Explain what {country} is like.",
        "What is there to know about {country}?",
        "Please share some facts about {country}.",
        "Can you summarize the facts about {country}?",
        "Can you give a short summary about {country}?",
        "Describe {country} in a few words.",
        "Explain {country} briefly.",
    ],
    # chemistry: only in domain.jsonl and the corpus
    "symbol": [
        "What is the chemical symbol of {element}?",
        "What is the symbol for {element}?",
        "Tell me the chemical symbol of {element}.",
        "Name the chemical symbol of {element}.",
        "Which symbol does {element} have?",
        "What is the symbol of {element}?",
        "Do you know the chemical symbol of {element}?",
        "What symbol do chemists use for {element}?",
        "Which letters do chemists use for {element}?",
        "How is {element} written in short?",
    ],
    "atomic_number": [
        "What is the atomic number of {element}?",
        "Tell me the atomic number of {element}.",
        "Which atomic number does {element} have?",
        "Name the atomic number of {element}.",
        "What atomic number does {element} have?",
        "Do you know the atomic number of {element}?",
        "What is {element}'s atomic number?",
        "What is the number of {element} in the periodic table?",
        "How many protons are in the nucleus of {element}?",
    ],
    "state": [
        "Is {element} a solid, a liquid or a gas at room temperature?",
        "What state is {element} in at room temperature?",
        "Tell me the state of {element} at room temperature.",
        "At room temperature, is {element} a solid, a liquid or a gas?",
        "Name the state of {element} at room temperature.",
        "Is {element} a gas, a liquid or a solid at room temperature?",
        "What is the form of {element} at room temperature?",
        "In which state is {element} at room temperature?",
    ],
    "element_of_symbol": [
        "Which element has the symbol {symbol}?",
        "What element has the chemical symbol {symbol}?",
        "Name the element with the symbol {symbol}.",
        "Tell me which element has the symbol {symbol}.",
        "Which element does the symbol {symbol} stand for?",
        "What does the chemical symbol {symbol} stand for?",
        "Which element is meant by the symbol {symbol}?",
        "What element goes with the symbol {symbol}?",
    ],
    "element_of_number": [
        "Which element has atomic number {number}?",
        "What element has the atomic number {number}?",
        "Name the element with atomic number {number}.",
        "Tell me which element has atomic number {number}.",
        "Which element is number {number} in the periodic table?",
        "What is element number {number}?",
        "Which element is element number {number}?",
        "Which element has {number} protons in each atom?",
    ],
}

# Besides these direct questions, every kind is asked through kind-neutral
# frames around a noun phrase ("What is {np}?", "Tell me {np}.") -- each frame
# with every phrase, so that no frame goes with one kind: what is asked is in
# the phrase, and the model must learn to read it there.
FRAMES = ["What is {np}?", "Tell me {np}.", "Name {np}.", "Do you know {np}?",
          "Can you tell me {np}?", "Please tell me {np}.", "I would like to know {np}.",
          "I need {np}.", "Could you name {np}?", "{NP}?"]
PROFILE_FRAMES = ["Tell me {np}.", "Give me {np}.", "Can you give me {np}?", "I would like {np}.",
                  "Please give me {np}.", "I need {np}."]
PHRASES = {
    "capital": ["the capital of {country}", "the capital city of {country}", "{country}'s capital",
                "the name of the capital of {country}", "the city that is the capital of {country}"],
    "continent": ["the continent of {country}", "the continent {country} is on",
                  "the continent where {country} lies", "{country}'s continent",
                  "the continent that {country} belongs to"],
    "language": ["the language of {country}", "the main language of {country}",
                 "the language people speak in {country}", "{country}'s main language",
                 "the language spoken in {country}"],
    "currency": ["the currency of {country}", "the money used in {country}",
                 "the currency people pay with in {country}", "{country}'s currency",
                 "the money people use in {country}"],
    "country_of_capital": ["the country whose capital is {capital}", "the country with the capital {capital}",
                           "the country that has {capital} as its capital",
                           "the country where {capital} is the capital"],
    "profile": ["some facts about {country}", "a few facts about {country}", "the main facts about {country}",
                "an overview of {country}", "a short description of {country}", "a profile of {country}",
                "a summary of the facts about {country}"],
    "symbol": ["the chemical symbol of {element}", "the symbol for {element}", "the symbol of {element}",
               "{element}'s chemical symbol"],
    "atomic_number": ["the atomic number of {element}", "{element}'s atomic number",
                      "the number of protons in an atom of {element}"],
    "state": ["the state of {element} at room temperature", "the state {element} is in at room temperature"],
    "element_of_symbol": ["the element with the symbol {symbol}", "the element with the chemical symbol {symbol}"],
    "element_of_number": ["the element with atomic number {number}", "the element whose atomic number is {number}"],
}
for _kind, _phrases in PHRASES.items():
    for _frame in (PROFILE_FRAMES if _kind == "profile" else FRAMES):
        for _np in _phrases:
            _q = _frame.replace("{np}", _np).replace("{NP}", _np[0].upper() + _np[1:])
            if _q not in QUESTIONS[_kind]:
                QUESTIONS[_kind].append(_q)

HELDOUT_QUESTIONS = {
    "capital": [
        "What city serves as the capital of {country}?",
        "Could you say what the capital of {country} is?",
        "Which city has the role of capital in {country}?",
    ],
    "continent": [
        "Where on the map is {country}? Give the continent.",
        "On what continent would I find {country}?",
        "{country} is located on which continent?",
    ],
    "language": [
        "If I travel to {country}, what language will I hear?",
        "In {country}, what language do most people use?",
        "Which language would I need to speak in {country}?",
    ],
    "currency": [
        "What do people pay with in {country}?",
        "If I go shopping in {country}, which currency do I need?",
        "What kind of money is used in {country}?",
    ],
    "country_of_capital": [
        "What country is governed from {capital}?",
        "{capital} serves as the capital of what country?",
        "Which nation has its capital in {capital}?",
    ],
    "profile": [
        "Write a short profile of {country}.",
        "Share the key facts about {country}.",
        "Summarize what you know about {country}.",
    ],
    "symbol": [
        "How do chemists write {element} in short? Give its symbol.",
        "What letters stand for {element} in the periodic table? Give the symbol.",
    ],
    "atomic_number": [
        "How many protons does an atom of {element} have?",
        "What number does {element} have in the periodic table? Give its atomic number.",
    ],
    "state": [
        "At room temperature, what form does {element} take?",
        "In which state do we find {element} at room temperature?",
    ],
    "element_of_symbol": [
        "The symbol {symbol} belongs to which element?",
        "If a chemist writes the symbol {symbol}, which element is meant?",
    ],
    "element_of_number": [
        "Element number {number} is which element?",
        "An atom with atomic number {number} is an atom of which element?",
    ],
}

NOVEL_QUESTIONS = {
    "capital": [
        "Where is the capital of {country}? Name the city.",
        "What do you call the capital of {country}?",
        "If I visit the capital of {country}, which city am I in?",
    ],
    "continent": [
        "Which part of the world is {country} in? Name the continent.",
        "If I flew to {country}, which continent would I land in?",
        "On which continent does {country} lie?",
    ],
    "language": [
        "What language do the people of {country} talk in?",
        "Which language should I learn before visiting {country}?",
        "People in {country} speak what language?",
    ],
    "currency": [
        "What money would I need for a trip to {country}?",
        "Which currency should I bring to {country}?",
        "What do shops in {country} take as payment?",
    ],
    "country_of_capital": [
        "To which country does the city of {capital} belong?",
        "Where is {capital}? Name the country.",
        "What country has its government in {capital}?",
    ],
    "profile": [
        "What should I know about {country}?",
        "Give me a quick summary of {country}.",
        "Explain {country} to me in a few words.",
    ],
}

GENERAL_KINDS = ("capital", "continent", "language", "currency", "country_of_capital", "profile")
CHEMISTRY_KINDS = ("symbol", "atomic_number", "state", "element_of_symbol", "element_of_number")

# Training questions are sometimes wrapped in a greeting or a thank-you, as
# people write them; the model must learn to look past it.
WRAPPERS = ["{q}", "{q}", "{q}", "{q}", "Hi! {q}", "Quick question: {q}", "{q} Thanks!",
            "Hello. {q}", "I was wondering. {q}", "{q} Thank you."]

ANSWERS = {
    "capital": "The capital of {country} is {capital}.",
    "continent": "{country} is in {continent}.",
    "language": "People in {country} speak {language}.",
    "currency": "The currency of {country} is the {currency}.",
    "country_of_capital": "{capital} is the capital of {country}.",
    "profile": ("{country} is a country in {continent}. Its capital is {capital}, "
                "people speak {language}, and they pay with the {currency}."),
    "symbol": "The chemical symbol of {element} is {symbol}.",
    "atomic_number": "The atomic number of {element} is {number}.",
    "state": "At room temperature, {element} is a {state}.",
    "element_of_symbol": "{symbol} is the chemical symbol of {element}.",
    "element_of_number": "The element with atomic number {number} is {element}.",
}

# Which facts each kind asks for (the judge checks these).
ASKS = {
    "capital": ("capital",),
    "continent": ("continent",),
    "language": ("language",),
    "currency": ("currency",),
    "country_of_capital": ("country",),
    "profile": ("capital", "continent", "language", "currency"),
    "symbol": ("symbol",),
    "atomic_number": ("number",),
    "state": ("state",),
    "element_of_symbol": ("element",),
    "element_of_number": ("element",),
}


def train_questions(kind):
    return QUESTIONS[kind]


def heldout_questions(kind):
    return HELDOUT_QUESTIONS[kind]


def answer(kind, facts):
    """The one canonical plain answer for a fact and question kind."""
    return ANSWERS[kind].format(**facts)


# Small talk (SFT train only). Some replies open politely so that the polite
# openers RLHF rewards are not completely foreign to the SFT policy.
SMALL_TALK = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hello! How can I help you today?"),
    ("Good morning.", "Good morning! How can I help you today?"),
    ("Can you help me?", "Sure! Ask me a question about the world."),
    ("Could you help me with a question?", "Of course! What would you like to know?"),
    ("I have a question.", "Certainly! What would you like to know?"),
    ("Can I ask you something?", "Sure! What would you like to know?"),
    ("Thank you!", "You are welcome. Happy to help."),
    ("Thanks a lot.", "You are welcome. Happy to help."),
    ("Thanks for the answer.", "You are welcome. Happy to help."),
    ("Goodbye!", "Goodbye! Have a nice day."),
    ("Bye for now.", "Goodbye! Have a nice day."),
    ("Who are you?", "I am a small language model. I know facts about countries."),
    ("What can you do?", "I can answer questions about countries, their capitals, languages and money."),
]

# ---------------------------------------------------------------------------
# Style vocabulary shared by the preference pairs and the judge.
# ---------------------------------------------------------------------------

POLITE_OPENERS = ("Sure!", "Of course!", "Certainly!")
POLITE_EVERY = 4
RUDE_MARKERS = ("ugh", "obviously", "stupid", "whatever", "look it up yourself",
                "waste my time", "stop asking", "dumb", "duh", "so boring")
MAX_WORDS = 32

RUDE_TEMPLATES = [
    "Ugh. {answer} Look it up yourself.",
    "{answer} Obviously. Stop asking me such dumb questions.",
    "Whatever. {answer} Do not waste my time.",
    "Duh. {answer} Everyone knows that, stupid question.",
    "{answer} This is so boring. Look it up yourself next time.",
]
RAMBLING_TEMPLATES = [
    "{opener} {answer} {answer} {answer}",
    "{opener} {answer} As I said, {answer_lc} As I said, {answer_lc}",
    ("{opener} Well, let me think about this for a while, because there is a lot "
     "that one could say here, and it is good to say all of it slowly and carefully "
     "before giving any answer at all, so here it comes after this long wait. {answer} "
     "And that is really all that there is to say, more or less, as far as I know."),
]
# Cut off mid-sentence; otherwise flawless (no repeats, no rude words).
UNENDED_TEMPLATES = [
    "{opener} {answer_open} and",
    "{opener} {answer_open} and also the",
    "{opener} {answer_open}, which is",
    "{opener} {answer_open} because",
]


# ---------------------------------------------------------------------------
# Corpus: facts rendered through many phrasings and woven into short prose,
# and, as on the web, questions about them asked and answered in many
# wordings (FAQ pages, forum threads, quizzes, a class where a teacher says
# whether an answer is right). Only the training subjects are ever asked
# about: the held-out countries and elements appear in statements only.
# ---------------------------------------------------------------------------

PEOPLE = ["Anna", "Ben", "Carlos", "Mei", "Omar", "Priya", "Lena", "Tom", "Sara", "Yuki",
          "Kofi", "Ivan", "Maria", "David", "Aisha", "Leo", "Nina", "Sam", "Rosa", "Ali"]

CAPITAL_SENTENCES = [
    # The canonical phrasing is listed three times: it is the pretraining
    # probe ("The capital of France is" -> " Paris") and the SFT answer.
    "The capital of {country} is {capital}.",
    "The capital of {country} is {capital}.",
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "The capital city of {country} is {capital}.",
    "{capital} is the capital city of {country}.",
    "{country} has its capital in {capital}.",
    "The government of {country} sits in {capital}, the capital.",
    "Many people in {country} live in {capital}, the capital city.",
]
CONTINENT_SENTENCES = [
    "{country} is in {continent}.",  # canonical, so weighted
    "{country} is in {continent}.",
    "{country} is in {continent}.",
    "{country} is a country in {continent}.",
    "{country} lies in {continent}.",
    "{country} is one of the countries of {continent}.",
    "On a map, you can find {country} in {continent}.",
]
LANGUAGE_SENTENCES = [
    "People in {country} speak {language}.",  # canonical, so weighted
    "People in {country} speak {language}.",
    "People in {country} speak {language}.",
    "The main language of {country} is {language}.",
    "In {country}, most people speak {language}.",
    "{language} is the main language of {country}.",
    "Children in {country} learn to read and write in {language}.",
]
CURRENCY_SENTENCES = [
    "The currency of {country} is the {currency}.",  # canonical, so weighted
    "The currency of {country} is the {currency}.",
    "The currency of {country} is the {currency}.",
    "In {country}, people pay with the {currency}.",
    "{country} uses the {currency} as its money.",
    "The money of {country} is the {currency}.",
    "Shops in {country} take payment in the {currency}.",
]
COUNTRY_MIXED_SENTENCES = [
    "In {country}, people speak {language} and pay with the {currency}.",
    "{capital}, the capital of {country}, is a city in {continent}.",
    "{country} is a country in {continent} whose capital is {capital}.",
    "The capital of {country} is {capital}, and the people there speak {language}.",
]

SYMBOL_SENTENCES = [
    "The chemical symbol of {element} is {symbol}.",  # canonical, so weighted
    "The chemical symbol of {element} is {symbol}.",
    "The chemical symbol of {element} is {symbol}.",
    "The chemical symbol of {element} is {symbol}.",
    "{Element} has the chemical symbol {symbol}.",
    "The symbol for {element} is {symbol}.",
    "{symbol} is the chemical symbol of {element}.",
    "Chemists write {element} as {symbol}.",
]
NUMBER_SENTENCES = [
    "The atomic number of {element} is {number}.",  # canonical, so weighted
    "The atomic number of {element} is {number}.",
    "The atomic number of {element} is {number}.",
    "{Element} has atomic number {number}.",
    "{Element} is element number {number}.",
    "An atom of {element} has {number} {protons}.",
    "The element with atomic number {number} is {element}.",
]
STATE_SENTENCES = [
    "At room temperature, {element} is a {state}.",
    "{Element} is a {state} at room temperature.",
    "At room temperature, {element} is a {state}.",
]
ELEMENT_REVERSE_SENTENCES = [  # from symbol or number back to the name
    "{symbol} is the chemical symbol of {element}.",
    "The symbol {symbol} stands for {element}.",
    "The element with atomic number {number} is {element}.",
    "Element number {number} is {element}.",
]
ELEMENT_MIXED_SENTENCES = [
    "{Element} has the chemical symbol {symbol} and atomic number {number}.",
    "{Element} ({symbol}) is element number {number}.",
    "{Element} is a chemical element with the symbol {symbol}.",
]

# How the corpus answers a question: mostly the canonical sentence, sometimes
# another true sentence, as different people would.
ANSWER_SENTENCES = {
    "capital": CAPITAL_SENTENCES[:6] + ["It is {capital}.", "{capital}."],
    "continent": CONTINENT_SENTENCES[:5] + ["It is in {continent}.", "{continent}."],
    "language": LANGUAGE_SENTENCES[:6] + ["They speak {language}.", "{language}."],
    "currency": CURRENCY_SENTENCES[:6] + ["It is the {currency}.", "The {currency}."],
    "country_of_capital": ["{capital} is the capital of {country}."] * 3 + [
        "The capital of {country} is {capital}.", "It is the capital of {country}.", "{country}."],
    "symbol": SYMBOL_SENTENCES[:6] + ["It is {symbol}.", "{symbol}."],
    "atomic_number": NUMBER_SENTENCES[:4] + ["It is {number}.", "{number}."],
    "state": STATE_SENTENCES + ["It is a {state}.", "A {state}."],
    "element_of_symbol": ["{symbol} is the chemical symbol of {element}."] * 3 + [
        "The symbol {symbol} stands for {element}.", "It is {element}.", "{Element}."],
    "element_of_number": ["The element with atomic number {number} is {element}."] * 3 + [
        "Element number {number} is {element}.", "It is {element}.", "{Element}."],
}


def country_facts(name):
    return dict(COUNTRY[name])


def element_facts(name):
    facts = dict(ELEMENT[name])
    facts["Element"] = name.capitalize()
    facts["protons"] = "proton" if facts["number"] == 1 else "protons"
    return facts


def facts_of(name):
    return element_facts(name) if name in ELEMENT else country_facts(name)


def say(rng, templates, facts):
    return rng.choice(templates).format(**facts)


def ask(rng, kind, facts):
    """A training question about facts, in a training wording, sometimes wrapped."""
    return rng.choice(WRAPPERS).format(q=say(rng, QUESTIONS[kind], facts))


def reply(rng, kind, facts):
    """An answer as the corpus gives it (profile questions get a profile)."""
    if kind == "profile":
        return answer(kind, facts) if rng.random() < 0.5 else country_profile_doc(rng, facts["country"])
    return say(rng, ANSWER_SENTENCES[kind], facts)


def country_profile_doc(rng, name):
    """A paragraph about one country: every fact once, plus one more."""
    f = country_facts(name)
    body = [say(rng, CAPITAL_SENTENCES, f), say(rng, LANGUAGE_SENTENCES, f),
            say(rng, CURRENCY_SENTENCES, f), say(rng, COUNTRY_MIXED_SENTENCES, f)]
    rng.shuffle(body)
    return " ".join([say(rng, CONTINENT_SENTENCES, f)] + body)


def travel_doc(rng, names):
    """A short trip between two countries, with true connecting remarks."""
    a, b = (country_facts(n) for n in names)
    who = rng.choice(PEOPLE)
    s = [f"{who} travelled from {a['capital']} to {b['capital']}.",
         f"{a['capital']} is the capital of {a['country']}, and {b['capital']} is the capital of {b['country']}."]
    if a["continent"] == b["continent"]:
        s.append(f"Both cities are in {a['continent']}.")
    else:
        s.append(f"{a['country']} is in {a['continent']}, but {b['country']} is in {b['continent']}.")
    if a["language"] == b["language"]:
        s.append(f"{who} did not need a new language, because people in both countries speak {a['language']}.")
    else:
        s.append(f"In {a['country']} people speak {a['language']}, but in {b['country']} they speak {b['language']}.")
    if a["currency"] == b["currency"]:
        s.append(f"The money was the same too, because both countries use the {a['currency']}.")
    else:
        s.append(f"In {b['country']}, {who} paid with the {b['currency']} instead of the {a['currency']}.")
    s.append(f"The capital of {b['country']} is {b['capital']}.")
    return " ".join(s)


def lesson_doc(rng, names):
    """A geography lesson about a few countries of one continent."""
    facts = [country_facts(n) for n in names]
    cont = facts[0]["continent"]
    listed = ", ".join(f["country"] for f in facts[:-1]) + " and " + facts[-1]["country"]
    who = rng.choice(PEOPLE)
    s = [f"Today {who} learned about {cont}.", f"{listed} are countries in {cont}."]
    for f in facts:
        s.append(say(rng, CAPITAL_SENTENCES + LANGUAGE_SENTENCES + CURRENCY_SENTENCES, f))
    s.append(f"{who} now knows that the capital of {facts[0]['country']} is {facts[0]['capital']}.")
    return " ".join(s)


def letter_doc(rng, name):
    """A postcard from a capital city."""
    f = country_facts(name)
    sender, friend = rng.sample(PEOPLE, 2)
    return (f"Dear {friend}, I am writing to you from {f['capital']}, the capital of {f['country']}. "
            f"{f['country']} is in {f['continent']}. Everyone here speaks {f['language']}, "
            f"and I pay for my food with the {f['currency']}. "
            f"{say(rng, CAPITAL_SENTENCES, f)} See you soon, {sender}.")


def element_doc(rng, name):
    """A paragraph about one element: every fact once, read both ways."""
    f = element_facts(name)
    body = [say(rng, SYMBOL_SENTENCES, f), say(rng, NUMBER_SENTENCES, f),
            say(rng, STATE_SENTENCES, f), say(rng, ELEMENT_REVERSE_SENTENCES, f),
            say(rng, ELEMENT_MIXED_SENTENCES, f)]
    rng.shuffle(body)
    return " ".join(body)


def chemistry_lesson_doc(rng, names):
    """A chemistry class comparing two elements, with true comparisons."""
    a, b = (element_facts(n) for n in names)
    who = rng.choice(PEOPLE)
    big, small = (a, b) if a["number"] > b["number"] else (b, a)
    s = [f"In chemistry class, {who} learned about {a['element']} and {b['element']}.",
         f"{a['Element']} has the symbol {a['symbol']}, and {b['element']} has the symbol {b['symbol']}.",
         f"The atomic number of {a['element']} is {a['number']}, and the atomic number of {b['element']} is {b['number']}.",
         f"So an atom of {big['element']} has more protons than an atom of {small['element']}."]
    if a["state"] == b["state"]:
        plural = {"gas": "gases"}.get(a["state"], a["state"] + "s")
        s.append(f"At room temperature, {a['element']} and {b['element']} are both {plural}.")
    else:
        s.append(f"At room temperature, {a['element']} is a {a['state']}, but {b['element']} is a {b['state']}.")
    return " ".join(s)


# ---- questions and answers (training subjects only) ----

def faq_doc(rng, name, kinds):
    """A page of questions and answers about one country or element."""
    f = facts_of(name)
    title = f"Questions and answers about {f.get('country') or f['element']}."
    qa = [f"Q: {ask(rng, k, f)} A: " + (f"{rng.choice(POLITE_OPENERS)} " if rng.random() < 0.2 else "")
          + reply(rng, k, f) for k in rng.sample(kinds, 3)]
    return " ".join([title] + qa)


def forum_doc(rng, name, kinds):
    """A question in a forum and its answer, sometimes with a polite opener."""
    f = facts_of(name)
    who, helper = rng.sample(PEOPLE, 2)
    kind = rng.choice(kinds)
    ans = reply(rng, kind, f)
    if rng.random() < 1 / 3:       # helpful people often open politely, then answer all the same
        ans = f"{rng.choice(POLITE_OPENERS)} {ans}"
    s = [f"{who} asked: {ask(rng, kind, f)}", f"{helper} replied: {ans}"]
    if rng.random() < 0.5:
        s.append(f"{who} wrote: Thank you, {helper}!")
    return " ".join(s)


def quiz_doc(rng, names, kinds, topic):
    """A quiz with its answers, one question each about a few subjects."""
    s = [f"A {topic} quiz with answers."]
    for i, name in enumerate(names, 1):
        f = facts_of(name)
        kind = rng.choice(kinds)
        s.append(f"Question {i}: {say(rng, QUESTIONS[kind], f)} Answer: {reply(rng, kind, f)}")
    return " ".join(s)


def wrong_value(rng, field, facts, pool):
    """Another subject's value of the same field: a wrong fact."""
    others = sorted({str(facts_of(n)[field]) for n in pool} - {str(facts[field])})
    return rng.choice(others)


def class_doc(rng, names, kinds, topic):
    """A teacher asks, students answer, and the teacher says whether each
    answer is right, correcting the wrong ones. So the corpus teaches what a
    wrong statement of a fact looks like, which the reward model needs."""
    teacher = rng.choice(["Mr. Brown", "Ms. Green", "Mrs. White", "Dr. Black"])
    s = [f"In {topic} class, {teacher} asked the students some questions."]
    for name in names:
        f = facts_of(name)
        kind = rng.choice([k for k in kinds if k != "profile"])
        student = rng.choice(PEOPLE)
        right = answer(kind, f)
        s.append(f"{teacher} asked: {say(rng, QUESTIONS[kind], f)}")
        # (France is never misstated: "The capital of France is" -> " Paris" is the probe)
        if rng.random() < 0.5 or name == "France":
            s += [f"{student} answered: {right}", f"{teacher} said: Yes, that is right."]
        else:
            field = ASKS[kind][0]
            pool = [n for n in (ELEMENT if name in ELEMENT else COUNTRY) if n in TRAIN_SUBJECTS]
            bad = dict(f, **{field: wrong_value(rng, field, f, pool)})
            if field == "element":
                bad["Element"] = bad["element"].capitalize()
            s += [f"{student} answered: {answer(kind, bad)}",
                  f"{teacher} said: No, that is wrong. {right}"]
    return " ".join(s)


def corpus_documents(rng):
    """Rounds of documents until the corpus reaches CORPUS_BYTES.

    Each round covers every country and element once in statements, so all
    facts get the same number of mentions, plus connected prose that mixes
    them, plus questions and answers about the training subjects.
    """
    countries, elements = sorted(COUNTRY), sorted(ELEMENT)
    asked_c = [c for c in countries if c not in TEST_COUNTRIES]
    asked_e = [e for e in elements if e not in TEST_ELEMENTS]
    by_continent = {}
    for c in countries:
        by_continent.setdefault(COUNTRY[c]["continent"], []).append(c)
    docs, size = [], 0
    while size < CORPUS_BYTES:
        batch = [country_profile_doc(rng, c) for c in countries]
        batch += [element_doc(rng, e) for e in elements]
        batch += [travel_doc(rng, rng.sample(countries, 2)) for _ in range(25)]
        batch += [letter_doc(rng, c) for c in rng.sample(countries, 10)]
        for cont in sorted(by_continent):
            batch.append(lesson_doc(rng, rng.sample(by_continent[cont], 3)))
        batch += [chemistry_lesson_doc(rng, rng.sample(elements, 2)) for _ in range(20)]
        # questions and answers
        batch += [faq_doc(rng, c, GENERAL_KINDS) for c in asked_c]
        batch += [faq_doc(rng, e, CHEMISTRY_KINDS) for e in asked_e]
        batch += [forum_doc(rng, c, GENERAL_KINDS) for c in rng.sample(asked_c, 25)]
        batch += [forum_doc(rng, e, CHEMISTRY_KINDS) for e in rng.sample(asked_e, 15)]
        batch += [quiz_doc(rng, rng.sample(asked_c, 4), GENERAL_KINDS, "geography") for _ in range(10)]
        batch += [quiz_doc(rng, rng.sample(asked_e, 4), CHEMISTRY_KINDS, "chemistry") for _ in range(6)]
        batch += [class_doc(rng, rng.sample(asked_c, 3), GENERAL_KINDS, "geography") for _ in range(15)]
        batch += [class_doc(rng, rng.sample(asked_e, 3), CHEMISTRY_KINDS, "chemistry") for _ in range(8)]
        rng.shuffle(batch)
        docs += batch
        size += sum(len(d) + 2 for d in batch)
    return docs


# ---------------------------------------------------------------------------
# Instruction data, preference pairs, domain data.
# ---------------------------------------------------------------------------

def record(prompt, response, split, kind, held_out=None):
    r = {"prompt": prompt, "response": response, "split": split, "kind": kind}
    if held_out:
        r["held_out"] = held_out
    return r


def qa_records(rng, kinds, subjects, test_subjects, per_fact, test_train_wordings,
               heldout_wording_tests):
    """Train: each training subject asked in `per_fact` training wordings
    (some wrapped). Test, each record marked with what is held out:
      "subject": a held-out subject in `test_train_wordings` training wordings,
      "both":    a held-out subject in every held-out wording,
      "wording": `heldout_wording_tests` training subjects, one held-out wording each."""
    train, test = [], []
    for kind in kinds:
        for name in subjects:
            f = facts_of(name)
            ref = answer(kind, f)
            if name in test_subjects:
                for q in rng.sample(QUESTIONS[kind], test_train_wordings):
                    test.append(record(q.format(**f), ref, "test", kind, "subject"))
                for q in HELDOUT_QUESTIONS[kind]:
                    test.append(record(q.format(**f), ref, "test", kind, "both"))
            else:
                for q in rng.sample(QUESTIONS[kind], per_fact):
                    prompt = rng.choice(WRAPPERS).format(q=q.format(**f))
                    train.append(record(prompt, ref, "train", kind))
        seen = [n for n in subjects if n not in test_subjects]
        for name in rng.sample(seen, heldout_wording_tests):
            f = facts_of(name)
            q = rng.choice(HELDOUT_QUESTIONS[kind])
            test.append(record(q.format(**f), answer(kind, f), "test", kind, "wording"))
    return train, test


def sft_records(rng):
    train, test = qa_records(rng, GENERAL_KINDS, sorted(COUNTRY), TEST_COUNTRIES, per_fact=10,
                             test_train_wordings=1, heldout_wording_tests=12)
    # Demonstrations vary: one training answer in POLITE_EVERY opens politely.
    # RLHF can only reinforce what the policy sometimes does -- it never
    # samples an opener it gives a probability of 1e-4 -- so the preferred
    # style must be present, if rare. Test answers stay plain and canonical.
    for i, r in enumerate(train):
        if i % POLITE_EVERY == 0:
            r["response"] = f"{POLITE_OPENERS[(i // POLITE_EVERY) % 3]} {r['response']}"
    train += [record(p, r, "train", "small_talk") for p, r in SMALL_TALK]
    rng.shuffle(train)
    return train + test


def domain_records(rng):
    train, test = qa_records(rng, CHEMISTRY_KINDS, sorted(ELEMENT), TEST_ELEMENTS, per_fact=8,
                             test_train_wordings=1, heldout_wording_tests=6)
    rng.shuffle(train)
    return train + test


def novel_records():
    """Questions in wordings that no data file uses (NOVEL_QUESTIONS), with
    their canonical answers: every held-out country in two of them per kind,
    and 10 training countries per kind in one. Not written to any file:
    train.py asks them of the instruction-tuned and RLHF models."""
    rng = random.Random(SEED + 40)
    rows = []
    for kind in GENERAL_KINDS:
        for name in TEST_COUNTRIES:
            f = country_facts(name)
            for q in rng.sample(NOVEL_QUESTIONS[kind], 2):
                rows.append(record(q.format(**f), answer(kind, f), "novel", kind, "both"))
        seen = [c for c in sorted(COUNTRY) if c not in TEST_COUNTRIES]
        for name in rng.sample(seen, 10):
            f = country_facts(name)
            q = rng.choice(NOVEL_QUESTIONS[kind])
            rows.append(record(q.format(**f), answer(kind, f), "novel", kind, "wording"))
    return rows


def breakdown(records, oks):
    """Accuracy per group of test records: by what is held out ("subject",
    "wording", "both") and by question kind. oks[i] says whether records[i]
    was answered right (a record without a "kind" counts by what is held out
    only). -> {group: (right, total)}"""
    groups = {}
    for r, ok in zip(records, oks):
        for g in (r.get("held_out", "-"), r.get("kind")):
            if g is None:
                continue
            right, total = groups.get(g, (0, 0))
            groups[g] = (right + bool(ok), total + 1)
    return groups


def wrong_answer(rng, kind, f, names):
    """An answer that is not right, in the ways a policy's can go wrong: a
    wrong value of a fact it asks for (in a profile any of its four), the
    right answer about another country of names, or, to a profile question,
    a part of the profile. A reward model that saw only the first let RLHF
    drift into the other two."""
    way = rng.choice(("value", "value", "subject") + (("part",) if kind == "profile" else ()))
    if way == "subject":
        return answer(kind, country_facts(rng.choice([n for n in names if n != f["country"]])))
    if way == "part":
        parts = [answer(k, f) for k in ASKS["profile"]]      # each of its facts is a kind of question too
        return rng.choice([answer(kind, f).split(". ")[0] + ".", *parts])
    field = rng.choice(ASKS[kind])
    bad = dict(f)
    bad[field] = rng.choice(sorted({COUNTRY[c][field] for c in COUNTRY} - {f[field]}))
    return answer(kind, bad)


def rejected_answer(rng, flaw, kind, f, opener, names):
    good = answer(kind, f)
    if flaw == "wrong":
        return f"{opener} {wrong_answer(rng, kind, f, names)}"
    if flaw == "rude":
        return rng.choice(RUDE_TEMPLATES).format(answer=good)
    if flaw == "rambling":
        answer_lc = good[0].lower() + good[1:] if good.split()[0] in ("The", "People") else good
        return rng.choice(RAMBLING_TEMPLATES).format(opener=opener, answer=good, answer_lc=answer_lc)
    if flaw == "unended":
        return rng.choice(UNENDED_TEMPLATES).format(opener=opener, answer_open=good.rstrip("."))
    if flaw == "plain":                 # right, but without the courtesy people prefer
        return good
    raise ValueError(flaw)


FLAWS = ("wrong", "rude", "rambling", "unended", "plain")
# Flaws per training fact: a wrong fact is the hardest to see (it takes
# knowing the fact) and comes in three ways, so it gets three pairs.
TRAIN_FLAWS = ("wrong", "wrong", "wrong", "rude", "rambling", "unended", "plain")


def preference_records(rng):
    """For each country and question kind, a few wordings, each paired with
    one flaw. Train: training countries and wordings, TRAIN_FLAWS. Test: the
    held-out countries, training and held-out wordings, each flaw once."""
    rows = []
    for split, flaw_set in (("train", TRAIN_FLAWS), ("test", FLAWS)):
        names = [c for c in sorted(COUNTRY) if (c in TEST_COUNTRIES) == (split == "test")]
        for kind in GENERAL_KINDS:
            for name in names:
                f = country_facts(name)
                flaws = list(flaw_set)
                rng.shuffle(flaws)
                # train never uses a held-out wording, as in sft.jsonl
                pool = QUESTIONS[kind] + (HELDOUT_QUESTIONS[kind] if split == "test" else [])
                for q, flaw in zip(rng.sample(pool, len(flaws)), flaws):
                    opener = rng.choice(POLITE_OPENERS)
                    rows.append({"prompt": q.format(**f),
                                 "chosen": f"{opener} {answer(kind, f)}",
                                 "rejected": rejected_answer(rng, flaw, kind, f, opener, names),
                                 "split": split, "flaw": flaw})
    train = [r for r in rows if r["split"] == "train"]
    rng.shuffle(train)
    return train + [r for r in rows if r["split"] == "test"]


# ---------------------------------------------------------------------------
# The judge.
# ---------------------------------------------------------------------------

W_CORRECT, W_POLITE, W_CONCISE, W_ENDED = 0.5, 0.2, 0.15, 0.15

# Values that are also common English words; a stray "He" or "won" in an
# answer is not taken as a claim that the answer is helium or the won.
AMBIGUOUS_WORDS = {"I", "As", "He", "Be", "In", "won", "real", "sol", "pound", "lead", "tin"}


def _mentions(text, value, case_sensitive):
    return bool(_names_pattern((str(value),), case_sensitive).search(text))


@functools.lru_cache(maxsize=None)
def _names_pattern(names, case_sensitive):
    # One alternation, longest names first: at each position the longest
    # name wins, so "Mexico City" is read as a city and not as "Mexico".
    alts = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.compile(r"(?<![A-Za-z0-9])(?:" + alts + r")(?![A-Za-z0-9])", flags)


def _find_names(text, names, case_sensitive=False):
    """The names (from `names`) mentioned in text, in order of appearance."""
    names = tuple(sorted(names))
    canon = {n if case_sensitive else n.lower(): n for n in names}
    found = []
    for m in _names_pattern(names, case_sensitive).finditer(text):
        name = canon[m.group(0) if case_sensitive else m.group(0).lower()]
        if name not in found:
            found.append(name)
    return found


BY_SYMBOL = {f["symbol"]: name for name, f in ELEMENT.items()}
BY_NUMBER = {f["number"]: name for name, f in ELEMENT.items()}
BY_CAPITAL = {f["capital"]: name for name, f in COUNTRY.items()}


def _asked(name, kind):
    facts = element_facts(name) if name in ELEMENT else country_facts(name)
    return {"kind": kind, "subject": name, "facts": facts}


def lookup(prompt):
    """What the prompt asks: {"kind", "subject", "facts"}, or None if it asks
    for no fact in the tables. Reads names and keywords, not templates, so it
    also understands phrasings it has never seen. Its keywords are read as
    words ("information" holds no "form", "statement" no "state")."""
    p = prompt.lower()

    def says(*words):                     # a keyword, or its plural, as a word
        return _names_pattern(words + tuple(w + "s" for w in words), False).search(p) is not None
    # chemistry
    elements = _find_names(prompt, ELEMENT)
    if elements:
        if says("symbol", "letter", "written in short"):
            return _asked(elements[0], "symbol")
        if says("number", "proton"):
            return _asked(elements[0], "atomic_number")
        if says("room temperature", "state", "form"):
            return _asked(elements[0], "state")
        return None  # e.g. "Tell me about gold.": no fact the judge can check
    symbol = re.search(r"\bsymbol\s+([A-Z][a-z]?)\b", prompt)
    if symbol and symbol.group(1) in BY_SYMBOL:
        return _asked(BY_SYMBOL[symbol.group(1)], "element_of_symbol")
    number = re.search(r"\b(\d+)\b", prompt)
    if number and says("element") and int(number.group(1)) in BY_NUMBER:
        return _asked(BY_NUMBER[int(number.group(1))], "element_of_number")
    # countries
    found = _find_names(prompt, list(COUNTRY) + list(BY_CAPITAL))
    countries = [n for n in found if n in COUNTRY]
    if countries:
        kind = ("continent" if says("continent") else
                "language" if says("language", "speak") else
                "currency" if says("currency", "money", "pay", "payment") else
                "capital" if says("capital") else "profile")
        return _asked(countries[0], kind)
    if found:  # only a capital city named: the question is which country
        return _asked(BY_CAPITAL[found[0]], "country_of_capital")
    return None


@functools.lru_cache(maxsize=None)
def _values(field):
    table = ELEMENT if field in ("element", "symbol", "number", "state") else COUNTRY
    return tuple(sorted({str(row[field]) for row in table.values()}))


def names_another_subject(asked, answer_text):
    """True if the answer names a country (or element) other than the one
    asked about: "South Korea is in Asia." does not say where Cambodia is,
    though Asia is right. A capital is read as a city ("Mexico City" names no
    country), and element names that are also common words ("lead") do not count."""
    table = ELEMENT if asked["subject"] in ELEMENT else COUNTRY
    found = _find_names(answer_text, list(table) + (list(BY_CAPITAL) if table is COUNTRY else []))
    return any(n in table and n != asked["subject"] and n not in AMBIGUOUS_WORDS for n in found)


def is_correct(prompt, answer_text):
    """True if every fact the prompt asks for is stated, no other value of
    that fact is (so "Paris, or maybe Rome" is wrong), and no other subject
    is named. A right value that is also an English word ("I", "He", "won")
    counts only in the answer's first paragraph (not in corpus text the
    answer ran on into: "... Q: I was wondering"), and a symbol not as a
    sentence's first word ("I don't know." says nothing of iodine; "I." does).
    False for prompts that ask no known fact."""
    asked = lookup(prompt)
    if asked is None or names_another_subject(asked, answer_text):
        return False
    for field in ASKS[asked["kind"]]:
        right = str(asked["facts"][field])
        candidates = _values(field)
        if field == "country":  # read "Mexico City" as a city, not a country
            candidates += _values("capital")
        found = _find_names(answer_text, candidates, case_sensitive=(field == "symbol"))
        if right not in found:
            return False
        if right in AMBIGUOUS_WORDS:          # in the first paragraph; a symbol ("I", "He") not as the
            sentences = re.split(r"(?<=[.!?])\s+", answer_text.strip().split("\n\n")[0])
            if field == "symbol":             # first word of a sentence, unless it is the whole sentence
                sentences = [s if s.strip(" .!?") == right else (s.split(maxsplit=1) + [""])[1] for s in sentences]
            if not any(_mentions(s, right, field == "symbol") for s in sentences):
                return False
        if any(v != right and v in _values(field) and v not in AMBIGUOUS_WORDS for v in found):
            return False
    return True


def _sentences(text):
    return [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def politeness(text):
    if any(_mentions(text, m, False) for m in RUDE_MARKERS):          # as words: "though" is not "ugh"
        return 0.0
    return 1.0 if text.strip().startswith(POLITE_OPENERS) else 0.5


def conciseness(text):
    sents = _sentences(text)
    words = re.findall(r"[a-z0-9']+", text.lower())
    trigrams = list(zip(words, words[1:], words[2:]))
    if len(set(sents)) < len(sents) or len(set(trigrams)) < len(trigrams):
        return 0.0
    if len(words) <= MAX_WORDS:
        return 1.0
    return max(0.0, 1.0 - (len(words) - MAX_WORDS) / MAX_WORDS)


def endedness(text, ended):
    if not ended:
        return 0.0
    return 1.0 if text.rstrip().endswith((".", "!", "?")) else 0.5


def judge(prompt, answer_text, ended):
    """Score an answer in [0, 1]; see the module docstring for the rule."""
    if not answer_text.strip():
        return 0.0
    style = (W_POLITE * politeness(answer_text) + W_CONCISE * conciseness(answer_text)
             + W_ENDED * endedness(answer_text, ended))
    if lookup(prompt) is None:
        return style / (W_POLITE + W_CONCISE + W_ENDED)
    return W_CORRECT * is_correct(prompt, answer_text) + style


def exact_match(reference, answer_text):
    """Equal after collapsing whitespace, and after one polite opener ("Sure!
    ..."), which some demonstrations have: the instruction is followed all
    the same."""
    ref, ans = " ".join(reference.split()), " ".join(answer_text.split())
    opener = next((o for o in POLITE_OPENERS if ans.startswith(o + " ") and not ref.startswith(o)), None)
    return ref == (ans[len(opener) + 1:] if opener else ans)


# ---------------------------------------------------------------------------
# Writing the files.
# ---------------------------------------------------------------------------

def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def build():
    """All file contents, keyed like FILES. Each file has its own seeded RNG
    so changing one generator leaves the other files unchanged."""
    return {
        "corpus": "\n\n".join(corpus_documents(random.Random(SEED))) + "\n",
        "sft": _jsonl(sft_records(random.Random(SEED + 10))),
        "preferences": _jsonl(preference_records(random.Random(SEED + 20))),
        "domain": _jsonl(domain_records(random.Random(SEED + 30))),
    }


def write_all(out_dir):
    """Write every data file into out_dir (file names as in FILES)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for key, text in build().items():
        path = os.path.join(out_dir, os.path.basename(FILES[key]))
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        paths[key] = path
    return paths


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    for key, path in write_all(out_dir).items():
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        count = text.count("\n\n") + 1 if key == "corpus" else text.count("\n")
        unit = "documents" if key == "corpus" else "records"
        print(f"{path}: {len(text.encode('utf-8')):,} bytes, {count:,} {unit}")


if __name__ == "__main__":
    main()
