"""Where step metrics go: a JSON line per step, TensorBoard scalars, and a progress bar.

Only the writing rank constructs one; nothing of mtl_scale is imported here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


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
