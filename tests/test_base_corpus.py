"""The embedded base's pretraining text: deterministic, and disjoint from the transfer suite's phrasings."""
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("faker")
from mtl_scale.base_corpus import corpus_documents  # noqa: E402

TRANSFER = Path(__file__).resolve().parent.parent / "bench" / "transfer"
# each transfer task's instruction, as its prompts spell it (bench/transfer/make_tasks.py)
PHRASINGS = ["capital letters", "«", "Which word ends", "<nums>", "ascending", "Reverse the word order",
             "Initials", "Wie viele Wörter hat"]


def test_corpus_is_deterministic():
    assert corpus_documents(200, seed=3) == corpus_documents(200, seed=3)
    assert corpus_documents(200, seed=3) != corpus_documents(200, seed=4)


def test_transfer_instructions_are_not_in_the_pretraining_text():
    for name in ["caps_name", "last_word", "sort_numbers", "reverse_words", "initials", "count_words"]:
        prompt = json.loads((TRANSFER / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[0])["prompt"]
        assert any(p in prompt for p in PHRASINGS), name
    text = "\n".join(corpus_documents(3000, seed=1234))
    assert [p for p in PHRASINGS if p in text] == []


def test_copy_documents_write_each_string_twice():
    from mtl_scale.base_corpus import COPY_LAYOUTS, copy_documents
    docs = copy_documents(50, seed=3)
    assert docs == copy_documents(50, seed=3) and docs != copy_documents(50, seed=4)
    # each one-line layout as a regex whose second {x} must repeat the first
    one_line = [re.compile("^" + re.escape(layout).replace(re.escape("{x}"), "(.+)", 1).replace(re.escape("{x}"), r"\1")
                           + "$", re.S) for layout in COPY_LAYOUTS if "\n" not in layout]
    for doc in docs:
        lines, i, examples = doc.split("\n"), 0, 0
        while i < len(lines):
            if any(p.match(lines[i]) for p in one_line):
                i += 1
            else:  # "{x}\n{x}": the string, then the same string on the next line
                assert i + 1 < len(lines) and lines[i] == lines[i + 1], doc
                i += 2
            examples += 1
        assert 2 <= examples <= 6
