"""Task sources: read a task's rows from a local file, a hub dataset or a built-in generator, map its
columns onto the fields its format needs, and split off held-out examples.

    rows = load_rows(task_cfg)            # list of dicts holding the format's fields
    train, held_out, duplicates_removed = split_rows(rows, task_cfg, seed)
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

from mtl_scale.config import TaskConfig
from mtl_scale.data import builtin
from mtl_scale.errors import UserError

# Fields each format reads from a row (after column mapping); optional ones may be absent.
FORMAT_FIELDS = {
    "prompt_completion": (("prompt", "completion"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "chat": (("messages",), ()),
}
LOCAL_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BUILTIN_DEFAULT_SIZE = 2000


def load_rows(task: TaskConfig) -> list[dict]:
    """All rows of ``task`` with the format's fields under their canonical names."""
    if task.source.startswith("builtin:"):
        gen = task.source.split(":", 1)[1]
        if gen not in builtin.GENERATORS:
            raise UserError(f"task {task.name!r}: unknown built-in generator {gen!r}; "
                            f"available: {', '.join('builtin:' + g for g in builtin.GENERATORS)}")
        if task.format != "prompt_completion":
            raise UserError(f"task {task.name!r}: built-in generators produce format prompt_completion, "
                            f"not {task.format!r}")
        rows = builtin.generate(gen, (task.num_examples or BUILTIN_DEFAULT_SIZE) + task.eval_size, seed=0)
        where = task.source
    else:
        rows, where = _load_dataset_rows(task)
    if not rows:
        raise UserError(f"task {task.name!r}: {where} has no examples")
    return _map_columns(rows, task, where)


def _load_dataset_rows(task: TaskConfig) -> tuple[list[dict], str]:
    import datasets

    path = Path(task.source).expanduser()
    suffix = path.suffix.lower()
    is_local = path.exists() or suffix in LOCAL_LOADERS or task.source.startswith((".", "/", "~"))
    if is_local:
        if path.is_dir():
            raise UserError(f"task {task.name!r}: source {task.source} is a directory; give a data file "
                            f"({', '.join(LOCAL_LOADERS)}) inside it")
        if not path.is_file():
            raise UserError(f"task {task.name!r}: data file {task.source} does not exist")
        if suffix not in LOCAL_LOADERS:
            raise UserError(f"task {task.name!r}: {task.source}: unsupported file type {suffix!r}; "
                            f"use one of {', '.join(LOCAL_LOADERS)}")
        if suffix == ".jsonl":
            # datasets' own errors do not say which line is broken, nor that there is none
            if _check_jsonl(path, task.name) == 0:
                raise UserError(f"task {task.name!r}: data file {task.source} has no examples "
                                "(no JSON object on any line)")
        elif path.stat().st_size == 0:
            raise UserError(f"task {task.name!r}: data file {task.source} is empty: it has no examples")
        elif suffix == ".json":
            _check_json(path, task.name)
        try:
            ds = datasets.load_dataset(LOCAL_LOADERS[suffix], data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 -- pyarrow/datasets raise many types for unreadable files
            raise UserError(f"task {task.name!r}: cannot read {task.source} as {suffix[1:]}: "
                            f"{type(e).__name__}: {str(e)[:300]}") from None
        return ds.to_list(), str(path)
    try:
        ds = datasets.load_dataset(task.source, task.subset, split=task.split)
    except Exception as e:  # noqa: BLE001 -- hub errors come in many types
        raise UserError(f"task {task.name!r}: cannot load hub dataset {task.source!r} (subset={task.subset}, "
                        f"split={task.split}): {type(e).__name__}: {str(e)[:300]}") from None
    return ds.to_list(), f"hub dataset {task.source}"


def _check_jsonl(path: Path, task: str) -> int:
    """Every non-blank line is a JSON object; returns how many there are."""
    count = 0
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"task {task!r}: {path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")
                if not isinstance(obj, dict):
                    raise UserError(f"task {task!r}: {path}:{lineno}: each line must be a JSON object, "
                                    f"got {type(obj).__name__}")
                count += 1
        except UnicodeDecodeError as e:
            raise UserError(f"task {task!r}: {path}: not UTF-8 text ({e})") from None
    return count


def _check_json(path: Path, task: str) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"task {task!r}: {path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"task {task!r}: {path}: not UTF-8 text ({e})") from None


def _map_columns(rows: list[dict], task: TaskConfig, where: str) -> list[dict]:
    required, optional = FORMAT_FIELDS[task.format]
    unknown = sorted(set(task.columns) - set(required) - set(optional))
    if unknown:
        raise UserError(f"task {task.name!r}: columns maps unknown field {unknown[0]!r}; format {task.format} "
                        f"has fields {', '.join(required + optional)}")
    present = list(rows[0].keys())
    source_of = {f: task.columns.get(f, f) for f in required + optional}
    for f in required:
        if source_of[f] not in rows[0]:
            hint = f" (mapped from field {f!r})" if f in task.columns else ""
            raise UserError(f"task {task.name!r}: {where} has no column {source_of[f]!r}{hint}; columns present: "
                            f"{', '.join(present)}. Map them with tasks[].columns, e.g. columns: {{{f}: <column>}}")
    out = []
    for i, row in enumerate(rows):
        mapped = {f: row.get(source_of[f]) for f in required + optional}
        for f in required:
            _check_field(mapped[f], f, task, where, i)
        out.append(mapped)
    return out


def _check_field(value, field: str, task: TaskConfig, where: str, i: int) -> None:
    if field == "messages":
        ok = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)
        if not ok:
            raise UserError(f"task {task.name!r}: {where}: row {i}: messages must be a non-empty list of "
                            f"{{role, content}} strings, got {str(value)[:120]}")
        if value[-1]["role"] != "assistant":
            raise UserError(f"task {task.name!r}: {where}: row {i}: the last message must be the assistant's "
                            f"(it is the completion trained on), got role {value[-1]['role']!r}")
    elif not isinstance(value, str):
        raise UserError(f"task {task.name!r}: {where}: row {i}: field {field!r} must be a string, "
                        f"got {type(value).__name__} {str(value)[:80]!r}")


class Split(NamedTuple):
    train: list[dict]
    held_out: list[dict]
    duplicates_removed: int
    """Exact repeats of an earlier row, removed before splitting so no example is on both sides."""


def split_rows(rows: list[dict], task: TaskConfig, seed: int) -> Split:
    """Drop exact duplicate rows, deterministically shuffle, hold out ``eval_size`` rows, cap the rest
    at ``num_examples``."""
    rows, duplicates = dedupe_rows(rows)
    if len(rows) <= task.eval_size:
        distinct = f"{len(rows)} distinct examples ({duplicates} exact duplicates removed)" if duplicates else \
            f"{len(rows)} examples"
        raise UserError(f"task {task.name!r} has {distinct} and eval_size={task.eval_size} leaves none "
                        f"for training; lower eval_size for this task")
    order = list(range(len(rows)))
    random.Random(f"split:{task.name}:{seed}").shuffle(order)
    held_out = [rows[i] for i in order[:task.eval_size]]
    train = [rows[i] for i in order[task.eval_size:]]
    if task.num_examples is not None:
        train = train[:task.num_examples]
    return Split(train, held_out, duplicates)


def dedupe_rows(rows: list[dict]) -> tuple[list[dict], int]:
    """The rows without exact repeats (all mapped fields equal), first occurrences kept in order, and
    how many were removed."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)
