"""The pretraining text of the embedded base: generated prose and generic string/list/number skills.

    docs = corpus_documents(n=1000, seed=0)      # deterministic for (n, seed, faker version)

70% of the documents are worked examples of ~50 generic skills (case mapping, counting, slicing,
reversing, sorting, formatting, arithmetic) over words, names, sentences, numbers and random
printable strings, each written in one of 10 generic layouts (``upper("Abc") = "ABC"``,
``Input:/Output:``, ``x => y``, a sentence) with 2-6 examples per document; 15% are prose and records
from faker in 12 locales (Latin, accented, Cyrillic and Greek text; names, addresses, emails, dates,
numbers); 15% are the demo's raw skills (``cab~bac``, ``12+3=15``...). A 2-layer model learns to copy
(the base of every skill here) from the skill examples; with half prose it had not by 1200 steps.

The layouts and instructions here are deliberately plain; the transfer suite (bench/transfer/)
asks for these skills in phrasings this module never writes (a test checks that).
"""
from __future__ import annotations

import random
import string
from typing import Callable

from mtl_scale.data import builtin

LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "pl_PL", "cs_CZ", "sv_SE",
           "ru_RU", "el_GR"]
PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "
ACCENTED = "àáâäãåçèéêëìíîïñòóôöõøùúûüýÿßæœÀÁÂÄÇÉÈÊÖÜÑØÆŒĄĆĘŁŃŚŹŻąćęłńśźżčďěňřšťůžČŘŠŽğışİŞ€£¥°"


class Source:
    """Random inputs: words, names, sentences, numbers and strings, from faker and a seeded rng."""

    def __init__(self, seed: int):
        from faker import Faker
        self.rng = random.Random(f"base-corpus:{seed}")
        self.fakers = {loc: Faker(loc) for loc in LOCALES}
        for i, f in enumerate(self.fakers.values()):
            f.seed_instance(f"{seed}:{i}")

    def fake(self):
        return self.fakers[self.rng.choice(LOCALES)]

    def word(self) -> str:
        r = self.rng.random()
        if r < 0.15:
            return "".join(self.rng.choice(string.ascii_lowercase) for _ in range(self.rng.randint(2, 9)))
        w = self.fake().word()
        return w.capitalize() if r > 0.8 else w

    def words(self, lo=2, hi=4) -> list[str]:
        return [self.word() for _ in range(self.rng.randint(lo, hi))]

    def name(self) -> str:
        return self.fake().name()

    def sentence(self) -> str:
        return self.fake().sentence(nb_words=self.rng.randint(2, 6))

    def chars(self, lo=1, hi=10) -> str:
        alphabet = PRINTABLE if self.rng.random() < 0.7 else PRINTABLE + ACCENTED
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(lo, hi)))

    def text(self) -> str:
        """Any of the input kinds, for the skills that apply to any string."""
        kind = self.rng.random()
        if kind < 0.3:
            return self.word()
        if kind < 0.5:
            return self.name()
        if kind < 0.7:
            return " ".join(self.words())
        if kind < 0.85:
            return self.chars()
        return self.sentence()

    def number(self) -> int:
        return self.rng.choice([self.rng.randint(0, 9), self.rng.randint(0, 99), self.rng.randint(0, 999),
                                self.rng.randint(0, 99999)])

    def numbers(self) -> list[int]:
        hi = self.rng.choice([9, 99, 999])
        return [self.rng.randint(0, hi) for _ in range(self.rng.randint(2, 7))]


def _list(xs) -> str:
    return ", ".join(map(str, xs))


# skill name -> (make (input text, answer) from a Source, instruction phrasings)
Skill = tuple[Callable[[Source], tuple[str, str]], list[str]]


def _s(fn, *descs) -> Skill:
    return fn, list(descs)


def _nth(s: Source):
    ws = s.words(3, 7)
    i = s.rng.randint(1, len(ws))
    return f"{' '.join(ws)} | {i}", ws[i - 1]


def _char_at(s: Source):
    t = s.text()
    i = s.rng.randint(1, len(t))
    return f"{t} | {i}", t[i - 1]


def _count_char(s: Source):
    t = s.text()
    c = s.rng.choice(t)
    return f"{t} | {c}", str(t.count(c))


def _replace(s: Source):
    t = s.text()
    a, b = s.rng.choice(t), s.rng.choice(string.ascii_letters + "_-*")
    return f"{t} | {a} | {b}", t.replace(a, b)


def _first_n(s: Source):
    t, n = s.text(), s.rng.randint(1, 5)
    return f"{t} | {n}", t[:n]


def _last_n(s: Source):
    t, n = s.text(), s.rng.randint(1, 5)
    return f"{t} | {n}", t[-n:]


def _slice(s: Source):
    t = s.text()
    i = s.rng.randint(0, max(0, len(t) - 1))
    j = s.rng.randint(i + 1, len(t))
    return f"{t} [{i}:{j}]", t[i:j]


def _binop(op):
    def make(s: Source):
        a, b = s.number(), s.number()
        if op == "-" and b > a:
            a, b = b, a
        if op == "*":
            a, b = s.rng.randint(0, 99), s.rng.randint(0, 12)
        return f"{a} {op} {b}", str(eval(f"{a}{op}{b}"))
    return make


def _words_to(s: Source, fn):
    ws = s.words(2, 6)
    return " ".join(ws), " ".join(fn(ws))


SKILLS: dict[str, Skill] = {
    "upper": _s(lambda s: (t := s.text(), t.upper()), "upper case", "uppercase", "to upper", "make it upper case",
                "in Großbuchstaben", "en majuscules"),
    "lower": _s(lambda s: (t := s.text(), t.lower()), "lower case", "lowercase", "to lower", "in Kleinbuchstaben",
                "en minuscules"),
    "title": _s(lambda s: (t := " ".join(s.words()).lower(), t.title()), "title case", "capitalize each word"),
    "swapcase": _s(lambda s: (t := s.text(), t.swapcase()), "swap case", "invert the case"),
    "capitalize": _s(lambda s: (t := s.text().lower(), t.capitalize()), "capitalize", "capitalize the first letter"),
    "copy": _s(lambda s: (t := s.text(), t), "copy", "repeat it", "echo", "same text"),
    "twice": _s(lambda s: (t := s.word(), t + t), "twice", "double it"),
    "reverse": _s(lambda s: (t := s.text(), t[::-1]), "reverse", "reversed", "backwards", "mirror it", "umgekehrt"),
    "reverse_words": _s(lambda s: _words_to(s, lambda ws: ws[::-1]), "words reversed", "reverse the words",
                        "last word first"),
    "sort_chars": _s(lambda s: (t := s.word(), "".join(sorted(t))), "sort the letters", "sorted characters"),
    "sort_words": _s(lambda s: _words_to(s, sorted), "sort the words", "words in alphabetical order"),
    "sort_numbers": _s(lambda s: (xs := s.numbers(), (_list(xs), _list(sorted(xs))))[1],
                       "sort", "sort the numbers", "smallest to largest", "in increasing order", "sortiert"),
    "sort_desc": _s(lambda s: (xs := s.numbers(), (_list(xs), _list(sorted(xs, reverse=True))))[1],
                    "sort descending", "largest to smallest", "in decreasing order"),
    "length": _s(lambda s: (t := s.text(), str(len(t))), "length", "number of characters", "len", "how long"),
    "word_count": _s(lambda s: (ws := s.words(1, 9), (" ".join(ws), str(len(ws))))[1],
                     "word count", "number of words", "count the words", "nombre de mots"),
    "list_count": _s(lambda s: (xs := s.numbers(), (_list(xs), str(len(xs))))[1], "count", "how many items"),
    "count_char": _s(_count_char, "count the character", "occurrences"),
    "vowels": _s(lambda s: (t := s.text(), str(sum(c in "aeiouAEIOU" for c in t))), "count vowels", "vowels"),
    "digits": _s(lambda s: (t := s.chars(4, 16), "".join(c for c in t if c.isdigit()) or "none"),
                 "only the digits", "extract digits"),
    "letters": _s(lambda s: (t := s.chars(4, 16), "".join(c for c in t if c.isalpha()) or "none"),
                  "only the letters", "extract letters"),
    "first_word": _s(lambda s: (t := s.sentence(), t.split()[0]), "first word", "opening word"),
    "last_word": _s(lambda s: (ws := s.words(2, 8), (" ".join(ws), ws[-1]))[1], "last word", "final word"),
    "nth_word": _s(_nth, "word number", "the n-th word"),
    "char_at": _s(_char_at, "character at position", "n-th character"),
    "first_n": _s(_first_n, "first n characters", "prefix"),
    "last_n": _s(_last_n, "last n characters", "suffix"),
    "slice": _s(_slice, "slice", "substring"),
    "first_letters": _s(lambda s: (t := s.name() if s.rng.random() < 0.5 else " ".join(s.words()),
                                   "".join(w[0] for w in t.split())), "first letters", "acronym", "abbreviate"),
    "remove_spaces": _s(lambda s: (t := " ".join(s.words()), t.replace(" ", "")), "remove spaces", "join up"),
    "underscores": _s(lambda s: (t := " ".join(s.words()), t.replace(" ", "_")), "snake case", "spaces to _"),
    "spaced": _s(lambda s: (t := s.word(), " ".join(t)), "spell it", "space the letters"),
    "replace": _s(_replace, "replace", "substitute"),
    "dedupe": _s(lambda s: (t := s.word(), "".join(dict.fromkeys(t))), "unique letters", "remove repeats"),
    "join": _s(lambda s: (ws := s.words(2, 5), (" ".join(ws), ", ".join(ws)))[1], "comma separated", "join with commas"),
    "add": _s(_binop("+"), "add", "sum", "plus", "addieren"),
    "sub": _s(_binop("-"), "subtract", "minus", "difference"),
    "mul": _s(_binop("*"), "multiply", "times", "product"),
    "list_sum": _s(lambda s: (xs := s.numbers(), (_list(xs), str(sum(xs))))[1], "total", "sum of the list"),
    "min": _s(lambda s: (xs := s.numbers(), (_list(xs), str(min(xs))))[1], "minimum", "smallest", "min"),
    "max": _s(lambda s: (xs := s.numbers(), (_list(xs), str(max(xs))))[1], "maximum", "largest", "max"),
    "next": _s(lambda s: (n := s.number(), (str(n), str(n + 1)))[1], "next number", "successor", "plus one"),
    "thousands": _s(lambda s: (n := s.rng.randint(1000, 9999999), (str(n), f"{n:,}"))[1],
                    "thousands separator", "format the number"),
    "zero_pad": _s(lambda s: (n := s.rng.randint(0, 999), (str(n), f"{n:05d}"))[1], "pad to 5 digits", "zero pad"),
    "digit_sum": _s(lambda s: (n := s.number(), (str(n), str(sum(map(int, str(n))))))[1], "digit sum", "add the digits"),
    "parity": _s(lambda s: (n := s.number(), (str(n), "even" if n % 2 == 0 else "odd"))[1], "even or odd", "parity"),
    "compare": _s(lambda s: (a := s.number(), b := s.number(),
                             (f"{a} ? {b}", "<" if a < b else ">" if a > b else "="))[2], "compare", "which is bigger"),
    "email_user": _s(lambda s: (e := s.fake().email(), (e, e.split("@")[0]))[1], "user part", "local part"),
    "email_domain": _s(lambda s: (e := s.fake().email(), (e, e.split("@")[1]))[1], "domain", "host"),
    "date_iso": _s(lambda s: (d := s.fake().date_object(), (d.strftime("%d/%m/%Y"), d.isoformat()))[1],
                   "ISO date", "to yyyy-mm-dd"),
}

# Generic layouts; {f} is the skill's function-style name, {d} one of its instruction phrasings.
LAYOUTS = [
    '{f}("{x}") = "{y}"',
    "{f}: {x} => {y}",
    "Input: {x}\nInstruction: {d}\nOutput: {y}",
    "{d}: {x}\n{y}",
    "Task: {d}\nText: {x}\nAnswer: {y}",
    "{x} -> {d} -> {y}",
    "### {d}\n{x}\n### result\n{y}",
    "{d}({x}) is {y}.",
    '"{x}" ({d}): "{y}"',
    "{x}\t{f}\t{y}",
]


def skill_document(s: Source) -> str:
    """2-6 worked examples of one skill in one layout."""
    name = s.rng.choice(sorted(SKILLS))
    make, descs = SKILLS[name]
    layout = s.rng.choice(LAYOUTS)
    lines = []
    for _ in range(s.rng.randint(2, 6)):
        x, y = make(s)
        lines.append(layout.format(f=name, d=s.rng.choice(descs), x=x, y=y))
    return "\n".join(lines)


def prose_document(s: Source) -> str:
    f, r = s.fake(), s.rng.random()
    if r < 0.35:
        return f.paragraph(nb_sentences=s.rng.randint(1, 3))
    if r < 0.55:
        return f.address()
    if r < 0.75:
        return "\n".join(f"{f.name()}, {f.job()}, {f.email()}" for _ in range(s.rng.randint(1, 3)))
    if r < 0.9:
        return f"{f.name()} ({f.date()}) {f.city()}, {f.phone_number()}"
    return f.text(max_nb_chars=200)


def raw_demo_document(s: Source) -> str:
    """The demo's raw skills (mtl_scale.data.builtin), a few lines at a time."""
    names = sorted(builtin.GENERATORS)
    return "\n".join(builtin.GENERATORS[s.rng.choice(names)](s.rng)[2] for _ in range(s.rng.randint(2, 8)))


COPY_LAYOUTS = ["{x} => {x}", "copy: {x} => {x}", "{x}\n{x}", 'copy("{x}") = "{x}"', "{x} | {x}"]


def copy_documents(n: int, seed: int) -> list[str]:
    """``n`` documents of 2-6 random strings (3-25 characters: letters, digits, punctuation, accented) each
    written twice. Copying is what every skill and every transfer task builds on, and a 2-layer model
    learns it (an induction circuit) only from text whose second half cannot be predicted any other way:
    with the skills and prose alone it had not after 4,000 steps."""
    rng = random.Random(f"copy-corpus:{seed}")
    alphabets = [string.ascii_letters + string.digits, PRINTABLE, PRINTABLE + ACCENTED]
    out = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(2, 6)):
            alphabet = rng.choice(alphabets)
            x = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 25)))
            lines.append(rng.choice(COPY_LAYOUTS).format(x=x))
        out.append("\n".join(lines))
    return out


def corpus_documents(n: int, seed: int) -> list[str]:
    """``n`` documents: 70% skills, 15% prose, 15% the demo's raw skills."""
    s = Source(seed)
    out = []
    for _ in range(n):
        r = s.rng.random()
        out.append(skill_document(s) if r < 0.7 else prose_document(s) if r < 0.85 else raw_demo_document(s))
    return out
