"""One optimizer step over a schedule of task-homogeneous micro-batches, with gradient surgery on
ZeRO-3's sharded gradients.

This module knows DeepSpeed's engine and tensors, nothing of files, YAML or datasets.

Loss normalisation: a micro-batch of task t contributes its summed completion-token NLL times
``loss_scale[t]``; the scales (mtl_scale/loss_weighting.py) undo DeepSpeed's division by the
accumulation steps and ZeRO's average over ranks, so the step minimises exactly the configured
objective (token-, task- or manually weighted).

Per-task gradients at no extra backward: a task's micro-batches are contiguous, and ZeRO-3
accumulates this rank's partition of the gradient across micro-steps, so the partition after task t's
micro-batches minus the partition before them is task t's gradient on this rank's shard. Stacking the
K task shards as S (K × n_local), S Sᵀ summed over ranks is the exact Gram matrix of the full task
gradients: one all-reduce of K² numbers. Every rank derives the same task weights w from it
(mtl_scale/surgery.py) and writes wᵀS back into its own shard before the optimizer step.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mtl_scale import attention
from mtl_scale import surgery as surgery_math
from mtl_scale.data.formatting import completion_tokens, example_count, loss_positions, real_tokens, summed_loss

# A step's work: (task, [micro-batch, ...]) groups, each micro-batch a dict of tensors.
StepGroups = list[tuple[str, list[dict[str, torch.Tensor]]]]


@dataclass
class Surgery:
    """Gradient surgery on the shared trainable parameters (the hard adapter, the hybrid's shared one)."""
    method: str
    params: list[torch.nn.Parameter]
    """Shared trainable parameters, ZeRO-3 partitioned."""
    seed: int
    """Seeds PCGrad's random task orders, per step: identical on every rank, reproducible on resume."""


@dataclass
class Coupling:
    """Soft sharing's regulariser λ·Σ_t ||θ_t − mean(θ)||² over corresponding task-adapter parameters."""
    strength: float
    groups: list[list[torch.nn.Parameter]]
    """Each: the same LoRA matrix in every task adapter (same shape, so same partition layout)."""


@dataclass
class SurgeryStats:
    tasks: list[str]
    gram: torch.Tensor
    """K×K dot products of the step's task gradients (shared parameters, all ranks)."""
    weights: torch.Tensor
    projections: int


@dataclass
class StepStats:
    """What this rank saw in one optimizer step, per task (sums, for exact averaging across ranks)."""
    loss_sum: dict[str, float] = field(default_factory=dict)
    """Summed completion-token NLL."""
    loss_tokens: dict[str, int] = field(default_factory=dict)
    """Completion tokens the loss was taken over."""
    tokens: int = 0
    """All non-padding tokens processed (attention_mask or, packed, token_mask)."""
    examples: dict[str, int] = field(default_factory=dict)
    """Examples processed (grouped and packed micro-batches hold a varying number)."""
    surgery: SurgeryStats | None = None


def optimizer_step(engine, groups: StepGroups, activate: Callable[[str], None], loss_scale: dict[str, float],
                   surgery: Surgery | None = None, coupling: Coupling | None = None, step: int = 0,
                   absent: Sequence[torch.nn.Parameter] = (), loss_in_model: bool = False,
                   logits_at_labels: bool = False, varlen_inputs: bool = False) -> StepStats:
    """Run the step's micro-batches (forward, backward), take per-task gradient shards, apply
    surgery, then let the last ``engine.step()`` update the parameters.

    ``absent``: trainable parameters no micro-batch of this step uses (the adapters of tasks not
    drawn); they leave the step exactly as they entered it, Adam moments included (see
    ``keep_unchanged``). ``loss_in_model``: the model computes the summed loss from the labels
    (Liger's fused linear cross-entropy, ``formatting.summed_loss``). ``logits_at_labels``: the model
    projects to the vocabulary (or the fused loss multiplies by lm_head) only where a label follows
    (``formatting.loss_positions``; the model must take ``logits_to_keep``). ``varlen_inputs``: packed
    micro-batches carry their examples' boundaries for attention per example (``attention.varlen_kwargs``:
    flash_attention_2, sdpa_varlen; the model must pass keyword arguments on to its attention).

    Every rank must call this with the same tasks and micro-batch counts in the same order: ZeRO-3
    gathers parameters and reduce-scatters gradients collectively at each micro-step.
    """
    n_micro = sum(len(mbs) for _, mbs in groups)
    if n_micro != engine.gradient_accumulation_steps():
        raise ValueError(f"step has {n_micro} micro-batches, DeepSpeed accumulates "
                         f"{engine.gradient_accumulation_steps()}: the update would straddle steps")
    clear_stale_grad_partitions(engine)
    stats = StepStats()
    loss_sums: dict[str, torch.Tensor] = {}  # kept on device: one host sync per step, not per micro-batch
    cumulative_shards = []  # after each task group: this rank's shard of the shared gradient so far
    done = 0
    for task, micro_batches in groups:
        activate(task)  # which adapter the LoRA layers apply; trainable parameters never change
        for batch in micro_batches:
            stats.loss_tokens[task] = stats.loss_tokens.get(task, 0) + completion_tokens(batch)
            stats.tokens += real_tokens(batch)
            stats.examples[task] = stats.examples.get(task, 0) + example_count(batch)
            if logits_at_labels:
                batch = {**batch, "loss_positions": loss_positions(batch["labels"])}
            if varlen_inputs and "position_ids" in batch:
                batch = {**batch, **attention.varlen_kwargs(batch["position_ids"])}
            batch = to_device(batch, engine.device)
            loss_sum = summed_loss(engine, batch, loss_in_model)  # padded: attention_mask; packed: position_ids
            engine.backward(loss_sum * loss_scale[task])
            loss_sums[task] = loss_sums.get(task, 0.0) + loss_sum.detach()
            done += 1
            if done < n_micro:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        if surgery is not None:
            copy_offloaded_grads(engine)  # a mid-step read needs the host copy current
            cumulative_shards.append(read_local_grads(surgery.params))
    copy_offloaded_grads(engine)  # every adapter's, not only those of the last micro-batch
    if surgery is not None:
        stats.surgery = apply_surgery(surgery, [t for t, _ in groups], cumulative_shards, step)
    if coupling is not None:
        add_coupling_grads(coupling)
    with keep_unchanged(engine, absent):
        engine.step()  # the accumulation boundary: clip, optimizer update, zero grads
    stats.loss_sum = {t: float(v) for t, v in loss_sums.items()}
    return stats


def to_device(batch: dict, device) -> dict:
    """The micro-batch's tensors on ``device`` (each tensor once: varlen_kwargs' q and k bounds are one),
    its other values (varlen_kwargs' lengths) as they are."""
    moved: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            if id(v) not in moved:
                moved[id(v)] = v.to(device, non_blocking=True)
            v = moved[id(v)]
        out[k] = v
    return out


def apply_surgery(surgery: Surgery, tasks: list[str], cumulative_shards: list[torch.Tensor],
                  step: int) -> SurgeryStats:
    """Per-task shards by differencing, Gram all-reduce, task weights, write-back of wᵀS."""
    shards = torch.stack(cumulative_shards)              # (K, n_local): the running sums after each task
    for k in range(len(shards) - 1, 0, -1):              # in place, last first: task k's own is sum_k - sum_k-1
        shards[k] -= shards[k - 1]
    shards64 = shards.double()                           # the one float64 copy (mtl_scale.plan.estimate.SURGERY_BYTES)
    gram = shards64 @ shards64.T                         # (K, K), this rank's share of every dot product
    del shards64
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(gram)
    orders = surgery_math.random_orders(len(tasks), torch.Generator().manual_seed(surgery.seed * 1_000_003 + step))
    if not torch.isfinite(gram).all():  # a non-finite gradient somewhere: DeepSpeed will skip this step
        return SurgeryStats(tasks, gram.float().cpu(), torch.ones(len(tasks)), 0)
    weights = surgery_math.task_weights(surgery.method, gram, orders)
    if surgery.method != "sum":  # sum = telemetry only: the accumulated gradient is already Σ_k g_k
        write_local_grads(surgery.params, weights.to(shards.dtype) @ shards)
    projections = surgery_math.pcgrad_projections(gram, orders) if surgery.method == "pcgrad" else 0
    return SurgeryStats(tasks, gram.float().cpu(), weights.float().cpu(), projections)


def add_coupling_grads(coupling: Coupling) -> None:
    """Add the regulariser's gradient, 2λ(θ_t − mean θ), to each task adapter's local shard.

    (The mean's own dependence on θ_t cancels: Σ_s (θ_s − mean) = 0.) Elementwise, so local shards
    suffice: corresponding parameters share a shape and hence a partition layout.
    """
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad
    for group in coupling.groups:
        thetas = torch.stack([safe_get_local_fp32_param(p).flatten() for p in group])
        mean = thetas.mean(dim=0)
        for p, theta in zip(group, thetas):
            grad = safe_get_local_grad(p).flatten()
            safe_set_local_grad(p, grad + 2 * coupling.strength * (theta - mean))


def read_local_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """This rank's partitions of the accumulated gradients of ``params``, concatenated (a copy)."""
    from deepspeed.utils import safe_get_local_grad
    return torch.cat([safe_get_local_grad(p).flatten().float() for p in params])


def write_local_grads(params: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_local_grad
    offset = 0
    for p in params:
        n = p.ds_tensor.numel()
        safe_set_local_grad(p, flat[offset:offset + n])
        offset += n


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
    elif type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3":
        raise RuntimeError("this DeepSpeed version's ZeRO-3 optimizer has no grad_partitions_flat_buffer: mtl_scale "
                           "cannot clear stale gradient partitions (see engine.py); use DeepSpeed 0.17-0.19")


def copy_offloaded_grads(engine) -> None:
    """With ``offload_optimizer``, make the host fp32 gradients (what the optimizer, the clip norm and
    ``safe_get_local_grad`` read) equal the accumulated partitions, for every trainable parameter.

    ZeRO-3 copies a partition to the host only at the accumulation boundary and only for parameters
    reduced in the step's *last* micro-batch (``partition_grads``). A task adapter absent from that
    micro-batch would keep the previous step's host gradient and norm, and a read between micro-batches
    sees last step's values. DeepSpeed's unmanaged-mode finalisation copies the parameters it saw
    reduced; given every parameter it copies them all (those of absent adapters are zero, see
    ``clear_stale_grad_partitions``). The copy is of this rank's LoRA partitions: small.
    """
    optimizer = engine.optimizer
    if not getattr(optimizer, "offload_optimizer", False):
        return
    if not hasattr(optimizer, "_finalize_offload_gradient_accumulation"):
        raise RuntimeError("this DeepSpeed version's ZeRO-3 optimizer has no _finalize_offload_gradient_accumulation: "
                           "mtl_scale cannot make offloaded gradients current (see engine.py); use DeepSpeed 0.19")
    optimizer._offload_boundary_param_ids = {p.ds_id for group in optimizer.fp16_groups for p in group}
    optimizer._finalize_offload_gradient_accumulation()


@contextmanager
def keep_unchanged(engine, params: Sequence[torch.nn.Parameter]):
    """Within this context, the optimizer's update leaves ``params`` as they are: their fp32 master
    values and Adam moments are restored right after the optimizer's own step, before ZeRO copies the
    master values into the model's weights.

    Why: ZeRO steps flat fp32 partitions, so a parameter with a zero gradient still moves (Adam's
    momentum, decoupled weight decay). For a task adapter whose task was not drawn that is drift, not
    learning. Adam's step count stays shared (one per flat partition), as in any flat-group optimizer.
    Works on the partitions this rank owns (ZeRO-3 and ZeRO-1/2, with or without offload).
    """
    if not params:
        yield
        return
    inner = engine.optimizer.optimizer  # the torch optimizer ZeRO drives, one flat partition at a time
    slices = _local_master_slices(engine.optimizer, params)
    own_step = inner.step

    def step_keeping(*args, **kwargs):
        stepping = {id(p) for group in inner.param_groups for p in group["params"]}
        saved = []
        for flat, start, numel in slices:
            if id(flat) in stepping:
                states = {k: v[start:start + numel].clone() for k, v in inner.state.get(flat, {}).items()
                          if torch.is_tensor(v) and v.shape == flat.shape}
                saved.append((flat, start, numel, flat.detach()[start:start + numel].clone(), states))
        out = own_step(*args, **kwargs)
        for flat, start, numel, value, states in saved:
            flat.detach()[start:start + numel].copy_(value)
            for k, v in states.items():
                inner.state[flat][k][start:start + numel].copy_(v)
        return out

    inner.step = step_keeping
    try:
        yield
    finally:
        inner.step = own_step


def _local_master_slices(optimizer, params) -> list[tuple[torch.Tensor, int, int]]:
    """(flat fp32 partition, start, numel) of each parameter's piece that this rank's optimizer steps."""
    out = []
    for p in params:
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
            group, start, numel = optimizer.grad_position[optimizer.get_param_id(p)]
            out.append((optimizer.fp32_partitioned_groups_flat[group], start, numel))
        elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2: the piece of p in this rank's partition
            m = p._hp_mapping
            out.append((optimizer.single_partition_of_fp32_groups[m.param_group_index],
                        m.hp_fragment_address.start, m.hp_fragment_address.numel))
        elif not hasattr(p, "_hp_mapping"):
            raise RuntimeError(f"keep_unchanged: {type(optimizer).__name__} is neither ZeRO-3 nor ZeRO-1/2; "
                               "mtl_scale cannot locate a parameter's optimizer state")
    return [s for s in out if s[2] > 0]
