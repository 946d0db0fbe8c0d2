"""Write the transfer suite: 6 small tasks the embedded base was never pretrained on, as jsonl files.

    python bench/transfer/make_tasks.py          # rewrites bench/transfer/<task>.jsonl (fixed seed)

Each task is ``{"prompt", "completion"}`` rows in an instruction style of its own (guillemets, pipes,
XML-ish tags, a German question, an email in angle brackets), with upper and lower case,
punctuation, digits and non-ASCII text from faker's locales; answers are 1-30 characters. The base
has the general skills (case mapping, slicing, sorting, counting) but none of these phrasings: LoRA
has to map a new instruction format onto them. Trained by bench/configs/transfer.yaml.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from faker import Faker

HERE = Path(__file__).resolve().parent
ROWS = 1200  # 100 held out by the config, the rest for training
SEED = 15
LOCALES = ["en_US", "de_DE", "fr_FR", "es_ES", "it_IT", "pl_PL", "cs_CZ", "pt_BR", "tr_TR", "sv_SE"]


def caps_name(fake: Faker, rng: random.Random) -> tuple[str, str]:
    name = fake.name()
    while len(name) > 30:
        name = fake.name()
    return f"Write this name in capital letters: «{name}»\n", " " + name.upper()


def last_word(fake: Faker, rng: random.Random) -> tuple[str, str]:
    words = fake.sentence(nb_words=rng.randint(3, 8)).rstrip(".").split()
    end = rng.choice(".!?")
    return f"Q: Which word ends the sentence '{' '.join(words)}{end}'?\nA:", " " + words[-1]


def sort_numbers(fake: Faker, rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(0, 1000), rng.randint(3, 6))
    return f"<nums>{', '.join(map(str, nums))}</nums> ascending:", " " + ", ".join(map(str, sorted(nums)))


def reverse_words(fake: Faker, rng: random.Random) -> tuple[str, str]:
    words = [w.capitalize() if rng.random() < 0.3 else w for w in fake.words(rng.randint(2, 5))]
    text = " ".join(words)
    while len(text) > 30:
        words = words[:-1]
        text = " ".join(words)
    return f"Reverse the word order | {text} |", " " + " ".join(reversed(words))


def initials(fake: Faker, rng: random.Random) -> tuple[str, str]:
    name = fake.name() if rng.random() < 0.7 else f"{fake.first_name()} {fake.first_name()} {fake.last_name()}"
    parts = [p for p in name.replace("-", " ").split() if p[0].isalpha() and not p.endswith(".")]
    return f"Initials of {name}?", " " + "".join(p[0].upper() + "." for p in parts)


def count_words(fake: Faker, rng: random.Random) -> tuple[str, str]:
    words = fake.words(rng.randint(1, 9))
    return f'Wie viele Wörter hat "{" ".join(words)}"? Antwort:', f" {len(words)}"


TASKS = {f.__name__: f for f in (caps_name, last_word, sort_numbers, reverse_words, initials, count_words)}


def build(name: str, n: int = ROWS) -> list[dict]:
    fake = Faker(LOCALES)
    fake.seed_instance(f"{name}:{SEED}")
    rng = random.Random(f"{name}:{SEED}")
    seen, rows = set(), []
    while len(rows) < n:
        prompt, completion = TASKS[name](fake, rng)
        if prompt not in seen and 1 <= len(completion.strip()) <= 30:
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def main() -> None:
    for name in TASKS:
        rows = build(name)
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} rows, e.g. {rows[0]}")


if __name__ == "__main__":
    main()
