"""Which task each micro-batch comes from, and which examples each rank reads.

Two kinds of randomness, kept apart on purpose:
- the *task schedule* of a step is drawn from an RNG seeded by (seed, step) only, so it is
  identical on every rank (ZeRO-3's collectives need the same forward/backward sequence
  everywhere) and a resumed run redraws exactly the same schedule;
- the *examples* of a task come from this rank's own disjoint shard of the task, in an order
  re-shuffled every epoch. A shard never runs out: it wraps into a new epoch, so no rank ever
  runs fewer micro-batches than another.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from mtl_scale.config import SamplingConfig


def task_probabilities(sizes: dict[str, int], cfg: SamplingConfig) -> dict[str, float]:
    """p_t for each task: proportional (∝ n_t), temperature (∝ n_t^(1/T)), uniform, or manual; for adaptive,
    the temperature distribution it starts from (mtl_scale/balancing.py moves it during training)."""
    if cfg.strategy == "proportional":
        w = {t: float(n) for t, n in sizes.items()}
    elif cfg.strategy in ("temperature", "adaptive"):  # adaptive: the prior its controller starts from
        w = {t: float(n) ** (1.0 / cfg.temperature) for t, n in sizes.items()}
    elif cfg.strategy == "uniform":
        w = {t: 1.0 for t in sizes}
    elif cfg.strategy == "manual":
        w = {t: float(cfg.weights[t]) for t in sizes}
    else:
        raise ValueError(cfg.strategy)
    total = sum(w.values())
    return {t: v / total for t, v in w.items()}


def step_plan(step: int, probs: dict[str, float], cfg: SamplingConfig, seed: int) -> list[tuple[str, int]]:
    """The step's schedule: [(task, n_micro_batches), ...], each task once, in order of first draw.

    ``tasks_per_step`` draws with replacement from ``probs``; a task drawn k times gets
    k * micro_batches_per_task consecutive micro-batches, so each task's micro-batches are
    contiguous. Total micro-batches = tasks_per_step * micro_batches_per_task, every step.
    """
    rng = random.Random(f"schedule:{seed}:{step}")
    tasks = list(probs)
    draws = rng.choices(tasks, weights=[probs[t] for t in tasks], k=cfg.tasks_per_step)
    counts: dict[str, int] = {}
    for t in draws:
        counts[t] = counts.get(t, 0) + cfg.micro_batches_per_task
    return list(counts.items())


@dataclass
class ShardReader:
    """This rank's shard of one task, read in a fresh random order each epoch."""
    task: str
    shard: list[int]
    seed: int
    rank: int
    epoch: int = 0
    cursor: int = 0

    def __post_init__(self):
        self._order = self._epoch_order()
        self._batches, self._batches_epoch = [], None  # take_batch's micro-batches of epoch _batches_epoch

    def _epoch_order(self) -> list[int]:
        order = list(self.shard)
        random.Random(f"order:{self.seed}:{self.task}:{self.rank}:{self.epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order()
            out.append(self._order[self.cursor])
            self.cursor += 1
        return out

    def take_batch(self, batcher) -> list[int]:
        """The next micro-batch of this epoch's order as ``batcher`` (batching.py: grouped, packed) cuts it.
        The cursor then counts micro-batches, not examples; a micro-batch never straddles epochs."""
        if self._batches_epoch != self.epoch:
            rng = random.Random(f"batches:{self.seed}:{self.task}:{self.rank}:{self.epoch}")
            self._batches, self._batches_epoch = batcher(self._order, rng), self.epoch
        if self.cursor == len(self._batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
            return self.take_batch(batcher)
        self.cursor += 1
        return self._batches[self.cursor - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order()
        self._batches_epoch = None


def rank_shard(n: int, rank: int, world: int) -> list[int]:
    """Disjoint strided shard of range(n); a task smaller than the world lends its examples round-robin
    so that no rank's shard is empty."""
    if n >= world:
        return list(range(rank, n, world))
    return [rank % n]


class TaskSampler:
    """The rank-identical task schedule plus this rank's example readers; resumable."""

    def __init__(self, sizes: dict[str, int], cfg: SamplingConfig, seed: int, rank: int, world: int):
        self.cfg, self.seed = cfg, seed
        self.probs = task_probabilities(sizes, cfg)
        self.readers = {t: ShardReader(t, rank_shard(n, rank, world), seed, rank) for t, n in sizes.items()}

    def plan(self, step: int) -> list[tuple[str, int]]:
        return step_plan(step, self.probs, self.cfg, self.seed)

    def take(self, task: str, n: int) -> list[int]:
        """Indices (into the task's train examples) of the next ``n`` examples of this rank's shard."""
        return self.readers[task].take(n)

    def take_batch(self, task: str, batcher) -> list[int]:
        """Indices of this rank's next micro-batch of ``task`` as ``batcher`` (batching.py) cuts its epochs."""
        return self.readers[task].take_batch(batcher)

    def state_dict(self) -> dict:
        return {"readers": {t: r.state_dict() for t, r in self.readers.items()}}

    def load_state_dict(self, state: dict) -> None:
        for t, s in state["readers"].items():
            self.readers[t].load_state_dict(s)
