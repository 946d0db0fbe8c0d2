"""Per-task quality metrics: how one generation (or the chosen option) is scored against its reference.

    metric = resolve(task_cfg)            # from tasks[].metric, answer_pattern, choices
    metric.score(prediction, reference)   # a float in [0, 1] for the built-ins
    metric.generates                      # False for `choice` (scored by log-likelihood, no generation)

Built in: ``exact_match`` (the whole answer, whitespace-stripped), ``extract`` (a regex pulls the answer
out of both sides, numbers compared as numbers: GSM8K's ``#### 1,234``), ``contains`` (the reference
appears in the generation), ``choice`` (the option with the highest log-likelihood, then exact match; the
log-likelihoods are computed in mtl_scale.evaluate) and ``rouge_l`` (rouge-score's ROUGE-L F1). Any other
value is a dotted path to a function ``(prediction, reference) -> float``, e.g. ``mypkg.metrics.f1`` or
``mypkg.metrics:f1``. Everything here is a pure function of strings.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

from mtl_scale.errors import UserError

BUILTIN = ("exact_match", "extract", "contains", "choice", "rouge_l")
# GSM8K's final answer: "#### 1,234" (lm-evaluation-harness's strict-match pattern, spaces allowed).
GSM8K_PATTERN = r"####\s*(-?[0-9.,]+)"


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def contains(prediction: str, reference: str) -> float:
    return float(reference.strip() in prediction)


def normalise_answer(text: str) -> str:
    """A number in canonical form (``1,234.50`` -> ``1234.5``, ``-3.`` -> ``-3``, ``$18`` -> ``18``), else
    the text stripped; so 18, 18.0 and 18.00 are one answer."""
    t = text.strip().replace(",", "").lstrip("$").rstrip(".")
    try:
        value = Decimal(t)
    except InvalidOperation:
        return text.strip()
    if not value.is_finite():
        return text.strip()
    return format(value.normalize(), "f") if value != 0 else "0"


def extract_answer(text: str, pattern: str) -> str | None:
    """Group 1 of ``pattern``'s first match in ``text`` (the whole match if it has no group), normalised;
    None if it does not match. The first match: a model that goes on after its answer ("#### 18\\n\\nQuestion:
    ... #### 7") is judged on the answer it gave."""
    m = re.search(pattern, text)
    if m is None:
        return None
    return normalise_answer(m.group(1) if m.re.groups else m.group(0))


def extract_match(prediction: str, reference: str, pattern: str = GSM8K_PATTERN) -> float:
    """1 when the answers ``pattern`` extracts from both sides are equal. A reference without a match is
    taken whole (a plain "42" reference); a prediction without one scores 0."""
    ref = extract_answer(reference, pattern)
    if ref is None:
        ref = normalise_answer(reference)
    return float(extract_answer(prediction, pattern) == ref)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Google's rouge-score package, stemming on, as in most summarisation papers)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


@dataclass(frozen=True)
class Metric:
    name: str
    """The tasks[].metric value (a built-in name or a dotted path)."""
    score: Callable[[str, str], float]
    generates: bool = True
    """False for ``choice``: the prediction is the likeliest option, not a generation."""
    stops_at_reference: bool = False
    """True when no generation longer than the reference can score (exact match): generation may stop at
    the reference's length + 2 tokens."""


def resolve(name: str, answer_pattern: str | None = None, task: str = "?") -> Metric:
    """The metric a task's config names, or a UserError saying what is allowed."""
    if name == "exact_match":
        return Metric(name, exact_match, stops_at_reference=True)
    if name == "choice":
        return Metric(name, exact_match, generates=False)
    if name == "contains":
        return Metric(name, contains)
    if name == "extract":
        pattern = answer_pattern or GSM8K_PATTERN
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"task {task!r}: answer_pattern {pattern!r} is not a valid regex: {e}") from None
        return Metric(name, lambda p, r: extract_match(p, r, pattern))
    if name == "rouge_l":
        try:
            import rouge_score  # noqa: F401
        except ImportError:
            raise UserError(f"task {task!r}: metric rouge_l needs the rouge-score package: "
                            "pip install 'mtl_scale[metrics]' (or pip install rouge-score)") from None
        return Metric(name, rouge_l)
    return Metric(name, _import_function(name, task))


def _import_function(path: str, task: str) -> Callable[[str, str], float]:
    module, sep, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module or not sep:
        raise UserError(f"task {task!r}: metric {path!r} is neither a built-in ({', '.join(BUILTIN)}) nor a dotted "
                        "path to a function (prediction, reference) -> float, e.g. mypkg.metrics.f1")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"task {task!r}: metric {path!r}: cannot import {attr!r} from {module!r} "
                        f"({type(e).__name__}: {e}); is the module on PYTHONPATH?") from None
    if not callable(fn):
        raise UserError(f"task {task!r}: metric {path!r} is not callable")
    return fn


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to the first stop string. A batch generates until every row stopped, and generate()
    keeps the stop string itself, so each row is cut here."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
