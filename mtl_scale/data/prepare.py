"""From task configs to tokenised train and held-out splits, ready for the sampler and evaluation."""
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


def prepare_tasks(cfg: RunConfig, tokenizer) -> dict[str, TaskData]:
    """Load, split and tokenise every task. Identical on every rank (deterministic by seed)."""
    out = {}
    for task in cfg.tasks:
        rows = load_rows(task)
        train_rows, held_rows = split_rows(rows, task, cfg.seed)
        train = encode(train_rows, task.format, tokenizer, cfg.max_seq_len, cfg.truncation)
        held_out = encode(held_rows, task.format, tokenizer, cfg.max_seq_len, cfg.truncation)
        if len(train) == 0:
            hint = "raise max_seq_len" + (" or use truncation: truncate" if cfg.truncation == "drop" else
                                          " (their prompts alone fill it)")
            raise UserError(f"task {task.name!r}: all {len(train_rows)} training examples are longer than "
                            f"max_seq_len={cfg.max_seq_len} (truncation={cfg.truncation}); {hint}")
        if train.truncated or train.dropped:
            log.warning("task %s: %d examples truncated, %d dropped (longer than max_seq_len=%d)",
                        task.name, train.truncated, train.dropped, cfg.max_seq_len)
        out[task.name] = TaskData(task, train, held_out)
    return out
