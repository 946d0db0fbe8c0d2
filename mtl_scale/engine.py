"""One optimizer step over a schedule of task-homogeneous micro-batches.

This module knows DeepSpeed's engine and tensors, nothing of files, YAML or datasets.

Loss normalisation: a micro-batch of task t contributes its summed completion-token NLL times
``loss_scale[t]``; the scales (mtl_scale/loss_weighting.py) undo DeepSpeed's division by the
accumulation steps and ZeRO's average over ranks, so the step minimises exactly the configured
objective (token-, task- or manually weighted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mtl_scale.data.formatting import token_loss_sum

# A step's work: (task, [micro-batch, ...]) groups, each micro-batch a dict of tensors.
StepGroups = list[tuple[str, list[dict[str, torch.Tensor]]]]


@dataclass
class StepStats:
    """What this rank saw in one optimizer step, per task (sums, for exact averaging across ranks)."""
    loss_sum: dict[str, float] = field(default_factory=dict)
    """Summed completion-token NLL."""
    loss_tokens: dict[str, int] = field(default_factory=dict)
    """Completion tokens the loss was taken over."""
    tokens: int = 0
    """All non-padding tokens processed."""


def optimizer_step(engine, groups: StepGroups, activate: Callable[[str], None],
                   loss_scale: dict[str, float]) -> StepStats:
    """Run every micro-batch of the step through forward, backward and ``engine.step()``.

    Every rank must call this with the same tasks and micro-batch counts in the same order: ZeRO-3
    gathers parameters and reduce-scatters gradients collectively at each micro-step. The optimizer
    update happens inside the last ``engine.step()`` (the gradient-accumulation boundary).
    """
    n_micro = sum(len(mbs) for _, mbs in groups)
    if n_micro != engine.gradient_accumulation_steps():
        raise ValueError(f"step has {n_micro} micro-batches, DeepSpeed accumulates "
                         f"{engine.gradient_accumulation_steps()}: the update would straddle steps")
    clear_stale_grad_partitions(engine)
    stats = StepStats()
    loss_sums: dict[str, torch.Tensor] = {}  # kept on device: one host sync per step, not per micro-batch
    device = engine.device
    for task, micro_batches in groups:
        activate(task)  # which adapter the LoRA layers apply; trainable parameters never change
        for batch in micro_batches:
            stats.loss_tokens[task] = stats.loss_tokens.get(task, 0) + int((batch["labels"][:, 1:] != -100).sum())
            stats.tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum, _ = token_loss_sum(logits, batch["labels"])
            engine.backward(loss_sum * loss_scale[task])
            engine.step()  # a no-op until the accumulation boundary, then the optimizer update
            loss_sums[task] = loss_sums.get(task, 0.0) + loss_sum.detach()
    stats.loss_sum = {t: float(v) for t, v in loss_sums.items()}
    return stats


def clear_stale_grad_partitions(engine) -> None:
    """Zero ZeRO-3's gradient partition buffer before a step's first micro-batch.

    ZeRO-3 *copies* a parameter's reduced gradient into its partition at micro-step 0 and *adds*
    at later micro-steps, and never clears the buffer otherwise. That is right only if every
    trainable parameter gets a gradient in every micro-batch. A task adapter does not: one that
    first appears at micro-step 2 would add onto last step's gradient, and one absent from a
    whole step would have last step's gradient applied again. Per-task adapters need a clean slate.
    """
    buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()
