"""From task configs to tokenised train and held-out splits, ready for the sampler and evaluation.

Held-out examples follow the same ``truncation`` rule as training ones: with ``truncate`` a long
completion is cut for the loss while exact match still judges the whole answer; an example whose
prompt alone fills ``max_seq_len`` cannot be generated from and is dropped. Drops, truncations and
removed duplicates are counted per task, logged, and reported by ``data_summary``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from mtl_scale.config import RunConfig, TaskConfig
from mtl_scale.data.formatting import Encoded, encode
from mtl_scale.data.tasks import load_rows, split_rows
from mtl_scale.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    config: TaskConfig
    train: Encoded
    held_out: Encoded
    duplicates_removed: int = 0
    """Exact duplicate rows removed before the train/held-out split."""


def prepare_tasks(cfg: RunConfig, tokenizer) -> dict[str, TaskData]:
    """Load, split and tokenise every task. Identical on every rank (deterministic by seed)."""
    out = {}
    for task in cfg.tasks:
        train_rows, held_rows, duplicates = split_rows(load_rows(task), task, cfg.seed)
        train = encode(train_rows, task.format, tokenizer, cfg.max_seq_len, cfg.truncation)
        held_out = encode(held_rows, task.format, tokenizer, cfg.max_seq_len, cfg.truncation)
        if len(train) == 0:
            hint = "raise max_seq_len" + (" or use truncation: truncate" if cfg.truncation == "drop" else
                                          " (their prompts alone fill it)")
            raise UserError(f"task {task.name!r}: all {len(train_rows)} training examples are longer than "
                            f"max_seq_len={cfg.max_seq_len} (truncation={cfg.truncation}); {hint}")
        if duplicates:
            log.warning("task %s: %d exact duplicate rows removed before the train/held-out split",
                        task.name, duplicates)
        for split, data in (("train", train), ("held-out", held_out)):
            if data.truncated or data.dropped:
                log.warning("task %s: %s: %d examples truncated, %d dropped (longer than max_seq_len=%d)",
                            task.name, split, data.truncated, data.dropped, cfg.max_seq_len)
        out[task.name] = TaskData(task, train, held_out, duplicates)
    return out


def data_summary(tasks: dict[str, TaskData]) -> dict[str, dict[str, int]]:
    """Per task: examples kept per split, what truncation did to each, duplicates removed."""
    return {name: {"train": len(d.train), "held_out": len(d.held_out),
                   "truncated": d.train.truncated, "dropped": d.train.dropped,
                   "held_out_truncated": d.held_out.truncated, "held_out_dropped": d.held_out.dropped,
                   "duplicates_removed": d.duplicates_removed}
            for name, d in tasks.items()}
