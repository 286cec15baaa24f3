"""Generate the bundled instruction data set and text corpus: `python -m moe_system.data.make_bundled [out_dir]`.

The tasks are chosen so that a tiny model trained for a few minutes on a CPU can visibly learn them: short
arithmetic, copying, reversing, sorting, and lookups in two small fixed tables. Digits and letters are written
with spaces between them so that the tokenizer keeps every one of them a single token. Prompts end in " =" or
" ->" and completions start with a space (the self_instruct {prompt, completion} schema).

Output is deterministic: one seeded generator per task, fixed iteration order, "\n" line endings, so running the
script again reproduces the committed files byte for byte (tests/test_data.py checks this).
"""

import json
import os
import random
import string
import sys

from .paths import BUNDLED_DIR

SEED = 1234

# Single-word countries with single-word capitals, so that a multi-item lookup is just words in a row.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Hungary": "Budapest", "Ireland": "Dublin", "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran",
    "Iraq": "Baghdad", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Canada": "Ottawa", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Ecuador": "Quito", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Australia": "Canberra",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Czechia": "Prague",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Ukraine": "Kyiv",
    "Lebanon": "Beirut", "Syria": "Damascus", "Jordan": "Amman", "Nepal": "Kathmandu", "Afghanistan": "Kabul",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Uganda": "Kampala", "Senegal": "Dakar", "Mali": "Bamako",
    "Iceland": "Reykjavik", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
}

# Every word appears in exactly one pair, so the lookup is unambiguous in both directions.
OPPOSITE_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("left", "right"), ("fast", "slow"), ("happy", "sad"),
    ("open", "closed"), ("light", "dark"), ("young", "old"), ("early", "late"), ("full", "empty"),
    ("high", "low"), ("hard", "soft"), ("long", "short"), ("rich", "poor"), ("wet", "dry"), ("strong", "weak"),
    ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"), ("first", "last"), ("win", "lose"),
    ("push", "pull"), ("in", "out"), ("day", "night"), ("north", "south"), ("east", "west"), ("true", "false"),
    ("yes", "no"), ("good", "bad"), ("buy", "sell"), ("give", "take"), ("start", "stop"), ("above", "below"),
    ("before", "after"), ("always", "never"), ("friend", "enemy"), ("black", "white"), ("sweet", "sour"),
    ("near", "far"),
]
OPPOSITES = {**dict(OPPOSITE_PAIRS), **{b: a for a, b in OPPOSITE_PAIRS}}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def spaced(n: int) -> str:
    """12 -> "1 2": one token per digit."""
    return " ".join(str(n))


def make_add(rng):
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{spaced(a)} + {spaced(b)} =", f" {spaced(a + b)}"


def make_sub(rng):
    a, b = rng.randrange(100), rng.randrange(100)
    a, b = max(a, b), min(a, b)
    return f"{spaced(a)} - {spaced(b)} =", f" {spaced(a - b)}"


def random_letters(rng):
    return [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))]


def make_copy(rng):
    items = [rng.choice(string.ascii_lowercase + string.digits) for _ in range(rng.randint(3, 7))]
    return f"copy: {' '.join(items)} ->", f" {' '.join(items)}"


def make_reverse(rng):
    items = random_letters(rng)
    return f"reverse: {' '.join(items)} ->", f" {' '.join(reversed(items))}"


def make_sort(rng):
    items = [rng.choice(string.digits) for _ in range(rng.randint(3, 7))]
    return f"sort: {' '.join(items)} ->", f" {' '.join(sorted(items))}"


def make_capital(rng):
    countries = rng.sample(sorted(CAPITALS), rng.randint(1, 3))
    return f"capital: {' '.join(countries)} ->", f" {' '.join(CAPITALS[c] for c in countries)}"


def make_opposite(rng):
    words = rng.sample(sorted(OPPOSITES), rng.randint(1, 3))
    return f"opposite: {' '.join(words)} ->", f" {' '.join(OPPOSITES[w] for w in words)}"


# task -> (generator, train examples, held-out examples); about 20k train and 500 held-out in all.
TASKS = {
    "add": (make_add, 5000, 125),
    "subtract": (make_sub, 3000, 75),
    "copy": (make_copy, 2000, 50),
    "reverse": (make_reverse, 3000, 75),
    "sort": (make_sort, 2500, 60),
    "capital": (make_capital, 2500, 65),
    "opposite": (make_opposite, 2000, 50),
}


def make_instructions(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Train and held-out records. Prompts are distinct within a task, so held-out never repeats a train prompt."""
    train, heldout = [], []
    for index, (task, (make, n_train, n_heldout)) in enumerate(TASKS.items()):
        rng = random.Random(seed * 100 + index)
        seen, records = set(), []
        while len(records) < n_train + n_heldout:
            prompt, completion = make(rng)
            if prompt not in seen:
                seen.add(prompt)
                records.append({"prompt": prompt, "completion": completion})
        heldout += records[:n_heldout]
        train += records[n_heldout:]
    mix = random.Random(seed)
    mix.shuffle(train)
    mix.shuffle(heldout)
    return train, heldout


def fact_sentence(rng) -> str:
    """One templated sentence stating a fact from the same tables and rules as the instruction tasks."""
    kind = rng.randrange(6)
    if kind == 0:
        country = rng.choice(sorted(CAPITALS))
        return rng.choice(["The capital of {c} is {k}.", "{k} is the capital of {c}.",
                           "{k} is a city in {c}, and it is the capital."]).format(c=country, k=CAPITALS[country])
    if kind == 1:
        word = rng.choice(sorted(OPPOSITES))
        return rng.choice(["The opposite of {a} is {b}.", "{A} is the opposite of {b}.",
                           "If it is not {a}, it may be {b}."]).format(a=word, A=word.capitalize(), b=OPPOSITES[word])
    if kind == 2:
        a, b = rng.randrange(11), rng.randrange(11)
        return f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
    if kind == 3:
        a, b = rng.randrange(100), rng.randrange(100)
        if rng.random() < 0.5:
            return f"{spaced(a)} plus {spaced(b)} equals {spaced(a + b)}."
        a, b = max(a, b), min(a, b)
        return f"{spaced(a)} minus {spaced(b)} equals {spaced(a - b)}."
    if kind == 4:
        items = random_letters(rng)
        return f"The letters {' '.join(items)} read backwards are {' '.join(reversed(items))}."
    items = [rng.choice(string.digits) for _ in range(rng.randint(3, 6))]
    return f"In order, the digits {' '.join(items)} are {' '.join(sorted(items))}."


def make_text(seed: int = SEED, n_lines: int = 3000) -> str:
    """Plain-text corpus: one short paragraph (one to three sentences, under 64 tokens) per line."""
    rng = random.Random(seed + 7)
    lines = [" ".join(fact_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_bundled(out_dir: str = BUNDLED_DIR, seed: int = SEED) -> None:
    os.makedirs(out_dir, exist_ok=True)
    train, heldout = make_instructions(seed)
    write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(out_dir, "heldout.jsonl"), heldout)
    with open(os.path.join(out_dir, "text.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(make_text(seed))


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else BUNDLED_DIR
    write_bundled(out)
    print(f"wrote train.jsonl, heldout.jsonl, text.txt to {out}")
