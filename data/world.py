"""The small, true world the model learns about -- and the judge of answers about it.

Run `python data/world.py` from the project root to (re)write the data files.
The output is deterministic: the same bytes every time (fixed seed, sorted
iteration, one JSON object per line with sorted keys, "\\n" line endings).

Files (paths relative to the project root; see FILES)
------------------------------------------------------
data/corpus.txt         Pretraining text. Plain ASCII prose; documents are
                        separated by one blank line. Every fact in the tables
                        below is stated dozens of times in varied phrasings.
data/sft.jsonl          Instruction conversations, one JSON object per line:
                        {"prompt": str, "response": str,
                         "split": "train" | "test", "kind": str}
                        Responses are short, plain, canonical sentences (one
                        per fact and question kind), e.g.
                        "The capital of France is Paris." General domain only
                        (countries); no chemistry. The test split is held out
                        by fact (countries never asked about in any training
                        file) and by phrasing (question templates never used
                        in training).
data/preferences.jsonl  Preference pairs, one JSON object per line:
                        {"prompt": str, "chosen": str, "rejected": str,
                         "split": "train" | "test", "flaw": str}
                        chosen = a polite opener + the correct plain answer,
                        e.g. "Sure! The capital of France is Paris."
                        rejected = the same with exactly one flaw:
                        "wrong" (a wrong fact), "rude" (rude words, no polite
                        opener), "rambling" (repeated or padded sentences),
                        "unended" (runs on and is cut off: the trainer must
                        NOT append the end-of-turn token to these; it appends
                        it to every chosen answer and every other rejected),
                        "plain" (correct, but without the polite opener).
                        Test prompts never appear in train.
data/domain.jsonl       Task fine-tuning (chemistry), same fields as sft.jsonl,
                        e.g. "What is the chemical symbol of gold?" ->
                        "The chemical symbol of gold is Au." Held out by
                        element.

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
CORPUS_BYTES = 1_200_000  # stop adding corpus documents past this size

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

# ---------------------------------------------------------------------------
# Question templates and canonical answers. The LAST template of each kind is
# held out by phrasing: it is used only in test records.
# ---------------------------------------------------------------------------

QUESTIONS = {
    "capital": [
        "What is the capital of {country}?",
        "Tell me the capital of {country}.",
        "Name the capital of {country}.",
        "What is the capital city of {country}?",
        "Which city is the capital of {country}?",
        "Do you know the capital of {country}?",
        "What city serves as the capital of {country}?",
    ],
    "continent": [
        "Which continent is {country} in?",
        "What continent is {country} on?",
        "On which continent is {country}?",
        "Tell me the continent of {country}.",
        "Name the continent where {country} is.",
        "Do you know which continent {country} is in?",
        "Where on the map is {country}? Give the continent.",
    ],
    "language": [
        "What language do people speak in {country}?",
        "Which language is spoken in {country}?",
        "What is the main language of {country}?",
        "Tell me the language of {country}.",
        "Name the language people speak in {country}.",
        "Do you know what language people speak in {country}?",
        "If I travel to {country}, what language will I hear?",
    ],
    "currency": [
        "What is the currency of {country}?",
        "Which currency is used in {country}?",
        "What money do people use in {country}?",
        "Tell me the currency of {country}.",
        "Name the currency of {country}.",
        "Do you know the currency of {country}?",
        "What do people pay with in {country}?",
    ],
    "country_of_capital": [
        "{capital} is the capital of which country?",
        "Which country has {capital} as its capital?",
        "Which country is {capital} the capital of?",
        "Tell me which country has the capital {capital}.",
        "Name the country whose capital is {capital}.",
        "Do you know which country has the capital {capital}?",
        "What country is governed from {capital}?",
    ],
    "profile": [
        "Tell me about {country}.",
        "Describe {country}.",
        "What do you know about {country}?",
        "Give me some facts about {country}.",
        "Tell me a few facts about {country}.",
        "Describe the country {country}.",
        "Write a short profile of {country}.",
    ],
    # chemistry: only in domain.jsonl
    "symbol": [
        "What is the chemical symbol of {element}?",
        "What is the symbol for {element}?",
        "Tell me the chemical symbol of {element}.",
        "Name the chemical symbol of {element}.",
        "Which symbol does {element} have?",
        "How do chemists write {element} in short? Give its symbol.",
    ],
    "atomic_number": [
        "What is the atomic number of {element}?",
        "Tell me the atomic number of {element}.",
        "Which atomic number does {element} have?",
        "Name the atomic number of {element}.",
        "What atomic number does {element} have?",
        "How many protons does an atom of {element} have?",
    ],
    "state": [
        "Is {element} a solid, a liquid or a gas at room temperature?",
        "What state is {element} in at room temperature?",
        "Tell me the state of {element} at room temperature.",
        "At room temperature, is {element} a solid, a liquid or a gas?",
        "Name the state of {element} at room temperature.",
        "At room temperature, what form does {element} take?",
    ],
    "element_of_symbol": [
        "Which element has the symbol {symbol}?",
        "What element has the chemical symbol {symbol}?",
        "Name the element with the symbol {symbol}.",
        "Tell me which element has the symbol {symbol}.",
        "Which element does the symbol {symbol} stand for?",
        "The symbol {symbol} belongs to which element?",
    ],
    "element_of_number": [
        "Which element has atomic number {number}?",
        "What element has the atomic number {number}?",
        "Name the element with atomic number {number}.",
        "Tell me which element has atomic number {number}.",
        "Which element is number {number} in the periodic table?",
        "Element number {number} is which element?",
    ],
}
GENERAL_KINDS = ("capital", "continent", "language", "currency", "country_of_capital", "profile")
CHEMISTRY_KINDS = ("symbol", "atomic_number", "state", "element_of_symbol", "element_of_number")

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
    return QUESTIONS[kind][:-1]


def heldout_question(kind):
    return QUESTIONS[kind][-1]


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
POLITE_EVERY = 8
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
# Corpus: facts rendered through many phrasings and woven into short prose.
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


def country_facts(name):
    return dict(COUNTRY[name])


def element_facts(name):
    facts = dict(ELEMENT[name])
    facts["Element"] = name.capitalize()
    facts["protons"] = "proton" if facts["number"] == 1 else "protons"
    return facts


def say(rng, templates, facts):
    return rng.choice(templates).format(**facts)


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


def corpus_documents(rng):
    """Rounds of documents until the corpus reaches CORPUS_BYTES.

    Each round covers every country and element once, so all facts get the
    same number of mentions, plus connected prose that mixes them.
    """
    countries, elements = sorted(COUNTRY), sorted(ELEMENT)
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
        rng.shuffle(batch)
        docs += batch
        size += sum(len(d) + 2 for d in batch)
    return docs


# ---------------------------------------------------------------------------
# Instruction data, preference pairs, domain data.
# ---------------------------------------------------------------------------

def record(prompt, response, split, kind):
    return {"prompt": prompt, "response": response, "split": split, "kind": kind}


def qa_records(rng, kinds, subjects, test_subjects, facts_of, test_phrasings_per_fact,
               heldout_phrasing_tests):
    """Train: train subjects x train phrasings.
    Test: held-out subjects (a few phrasings each, always incl. the held-out
    one) plus `heldout_phrasing_tests` train subjects asked with the held-out
    phrasing only."""
    train, test = [], []
    for kind in kinds:
        for name in subjects:
            f = facts_of(name)
            reply = answer(kind, f)
            if name in test_subjects:
                picks = rng.sample(train_questions(kind), test_phrasings_per_fact - 1)
                for q in picks + [heldout_question(kind)]:
                    test.append(record(q.format(**f), reply, "test", kind))
            else:
                for q in train_questions(kind):
                    train.append(record(q.format(**f), reply, "train", kind))
        seen = [n for n in subjects if n not in test_subjects]
        for name in rng.sample(seen, heldout_phrasing_tests):
            f = facts_of(name)
            test.append(record(heldout_question(kind).format(**f), answer(kind, f), "test", kind))
    return train, test


def sft_records(rng):
    train, test = qa_records(rng, GENERAL_KINDS, sorted(COUNTRY), TEST_COUNTRIES,
                             country_facts, test_phrasings_per_fact=2, heldout_phrasing_tests=20)
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
    train, test = qa_records(rng, CHEMISTRY_KINDS, sorted(ELEMENT), TEST_ELEMENTS,
                             element_facts, test_phrasings_per_fact=3, heldout_phrasing_tests=6)
    rng.shuffle(train)
    return train + test


def wrong_facts(rng, kind, f):
    """The same facts with the asked one swapped for a wrong value."""
    field = {"profile": "capital"}.get(kind, ASKS[kind][0])
    others = sorted({COUNTRY[c][field] for c in COUNTRY} - {f[field]})
    bad = dict(f)
    bad[field] = rng.choice(others)
    return bad


def rejected_answer(rng, flaw, kind, f, opener):
    good = answer(kind, f)
    if flaw == "wrong":
        return f"{opener} {answer(kind, wrong_facts(rng, kind, f))}"
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


def preference_records(rng):
    """For each country and question kind, a few phrasings, each paired with
    one flaw (cycling so all flaws are equally common)."""
    rows = []
    for split, per_fact in (("train", 5), ("test", 5)):
        names = [c for c in sorted(COUNTRY) if (c in TEST_COUNTRIES) == (split == "test")]
        for kind in GENERAL_KINDS:
            for name in names:
                f = country_facts(name)
                flaws = list(FLAWS)
                rng.shuffle(flaws)
                # train never uses a held-out phrasing, as in sft.jsonl
                pool = train_questions(kind) if split == "train" else QUESTIONS[kind]
                for i, q in enumerate(rng.sample(pool, per_fact)):
                    opener = rng.choice(POLITE_OPENERS)
                    flaw = flaws[i % len(flaws)]
                    rows.append({"prompt": q.format(**f),
                                 "chosen": f"{opener} {answer(kind, f)}",
                                 "rejected": rejected_answer(rng, flaw, kind, f, opener),
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
    also understands phrasings it has never seen."""
    p = prompt.lower()
    # chemistry
    elements = _find_names(prompt, ELEMENT)
    if elements:
        if "symbol" in p:
            return _asked(elements[0], "symbol")
        if "atomic number" in p or "proton" in p:
            return _asked(elements[0], "atomic_number")
        if "room temperature" in p or "state" in p:
            return _asked(elements[0], "state")
        return None  # e.g. "Tell me about gold.": no fact the judge can check
    symbol = re.search(r"\bsymbol\s+([A-Z][a-z]?)\b", prompt)
    if symbol and symbol.group(1) in BY_SYMBOL:
        return _asked(BY_SYMBOL[symbol.group(1)], "element_of_symbol")
    number = re.search(r"\b(\d+)\b", prompt)
    if number and "element" in p and int(number.group(1)) in BY_NUMBER:
        return _asked(BY_NUMBER[int(number.group(1))], "element_of_number")
    # countries
    found = _find_names(prompt, list(COUNTRY) + list(BY_CAPITAL))
    countries = [n for n in found if n in COUNTRY]
    if countries:
        kind = ("continent" if "continent" in p else
                "language" if ("language" in p or "speak" in p) else
                "currency" if ("currency" in p or "money" in p or " pay" in p) else
                "capital" if "capital" in p else "profile")
        return _asked(countries[0], kind)
    if found:  # only a capital city named: the question is which country
        return _asked(BY_CAPITAL[found[0]], "country_of_capital")
    return None


@functools.lru_cache(maxsize=None)
def _values(field):
    table = ELEMENT if field in ("element", "symbol", "number", "state") else COUNTRY
    return tuple(sorted({str(row[field]) for row in table.values()}))


def is_correct(prompt, answer_text):
    """True if every fact the prompt asks for is stated and no other value of
    that fact is (so "Paris, or maybe Rome" is wrong). False for prompts that
    ask no known fact."""
    asked = lookup(prompt)
    if asked is None:
        return False
    for field in ASKS[asked["kind"]]:
        right = str(asked["facts"][field])
        candidates = _values(field)
        if field == "country":  # read "Mexico City" as a city, not a country
            candidates += _values("capital")
        found = _find_names(answer_text, candidates, case_sensitive=(field == "symbol"))
        if right not in found:
            return False
        if any(v != right and v in _values(field) and v not in AMBIGUOUS_WORDS for v in found):
            return False
    return True


def _sentences(text):
    return [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def politeness(text):
    t = text.lower()
    if any(m in t for m in RUDE_MARKERS):
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
    """Equal after collapsing whitespace."""
    return " ".join(reference.split()) == " ".join(answer_text.split())


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
