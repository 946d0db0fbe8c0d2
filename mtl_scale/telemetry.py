"""Step metrics: made from a step's StepStats (``reduce_stats``, summed over ranks; ``surgery_metrics``), and
written (``MetricsWriter``: a JSON line per step, TensorBoard scalars, and a progress bar; rank 0 only).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mtl_scale.surgery import cosine_matrix


class MetricsWriter:
    def __init__(self, output_dir: str | Path, total_steps: int, initial_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a fresh file; a run continuing from a step appends to its history.
        self._jsonl = (self.dir / "metrics.jsonl").open("a" if initial_step else "w", buffering=1)
        self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """``metrics`` holds flat ``name -> number`` pairs, e.g. ``loss/copy``."""
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)
        losses = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("loss/")}
        postfix = {t: f"{v:.3f}" for t, v in losses.items()}
        postfix["tok/s"] = f"{metrics.get('tokens_per_s', 0):.0f}"
        self._bar.set_postfix(postfix, refresh=False)

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
        self._tb.close()
        self._jsonl.close()


def _clean(v):
    """JSON has no NaN/inf: write them as strings so the line stays parseable."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def reduce_stats(run, stats) -> dict[str, float]:
    """Sum per-task loss, token and example counts over ranks (one small all-reduce) into step metrics."""
    names = list(run.tasks)
    vec = torch.tensor([stats.loss_sum.get(t, 0.0) for t in names] +
                       [float(stats.loss_tokens.get(t, 0)) for t in names] + [float(stats.tokens)] +
                       [float(stats.examples.get(t, 0)) for t in names],
                       dtype=torch.float64, device=run.engine.device)
    torch.distributed.all_reduce(vec)
    vec = vec.cpu().tolist()
    k = len(names)
    out = {}
    total_loss, total_tokens = 0.0, 0.0
    for i, t in enumerate(names):
        if vec[k + i] > 0:
            out[f"loss/{t}"] = vec[i] / vec[k + i]
            out[f"tokens/{t}"] = vec[k + i]
            total_loss, total_tokens = total_loss + vec[i], total_tokens + vec[k + i]
    out["loss"] = total_loss / total_tokens
    out["tokens"] = vec[2 * k]
    out.update({f"examples/{t}": vec[2 * k + 1 + i] for i, t in enumerate(names)})
    return out


def surgery_metrics(s, task_order: list[str]) -> dict[str, float]:
    """Per-task gradient norms and surgery weights, pairwise cosines, conflicts and projections."""
    cos = cosine_matrix(s.gram)
    out = {"surgery/projections": float(s.projections)}
    for i, t in enumerate(s.tasks):
        out[f"grad_norm/{t}"] = float(s.gram[i, i].clamp(min=0).sqrt())
        out[f"surgery_weight/{t}"] = float(s.weights[i])
    pairs = []
    for i in range(len(s.tasks)):
        for j in range(i + 1, len(s.tasks)):
            a, b = sorted((s.tasks[i], s.tasks[j]), key=task_order.index)
            out[f"grad_cos/{a}|{b}"] = float(cos[i, j])
            pairs.append(float(cos[i, j]))
    if pairs:
        out["surgery/conflict_fraction"] = sum(c < 0 for c in pairs) / len(pairs)
    return out
