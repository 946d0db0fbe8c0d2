"""The embedded base's pretraining text: deterministic, and disjoint from the transfer suite's phrasings."""
import json
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
