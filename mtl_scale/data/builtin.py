"""Built-in procedurally generated tasks with exact-match answers, deterministic by seed.

Each task has two faces:
- an *instruction* form the adapters are fine-tuned on, ``<verb> [<input>] ->`` / `` <answer>``,
  e.g. ``repeat [cab] ->`` / `` cab``;
- a *raw skill* form, e.g. ``cab:cab``, used only in the embedded base's pretraining text
  (mtl_scale.base_corpus, among many generic skills), so the base already has the skill but not
  the instruction format.
LoRA on a random frozen base barely learns (see docs); on a base that has the skills it learns
to route the instruction to the skill in minutes on a CPU, which is the honest picture of what
LoRA does to a real pretrained model.
"""
from __future__ import annotations

import random
from typing import Callable

LETTERS = "abcdefghij"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))


def _copy(rng):
    w = _word(rng)
    return f"repeat [{w}] ->", f" {w}", f"{w}:{w}"


def _reverse(rng):
    w = _word(rng)
    return f"backwards [{w}] ->", f" {w[::-1]}", f"{w}~{w[::-1]}"


def _sort(rng):
    w = _word(rng)
    s = "".join(sorted(w))
    return f"sort [{w}] ->", f" {s}", f"{w}^{s}"


def _add(rng):
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add [{a}+{b}] ->", f" {a + b}", f"{a}+{b}={a + b}"


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "copy": _copy, "reverse": _reverse, "sort": _sort, "add": _add,
}


def generate(name: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct examples ``{"prompt", "completion"}`` of task ``name`` (fewer only if the task
    has fewer distinct examples), the same for the same seed on every machine."""
    if name not in GENERATORS:
        raise KeyError(name)
    rng = random.Random(f"{name}:{seed}")
    seen, out = set(), []
    for _ in range(20 * n):  # bounded: small tasks (add) have few distinct examples
        prompt, completion, _ = GENERATORS[name](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "completion": completion})
            if len(out) == n:
                break
    return out
