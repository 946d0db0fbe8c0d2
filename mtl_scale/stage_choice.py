"""``deepspeed_config: auto``: the ZeRO stage, from the model's shape, the memory per GPU and the world size,
by the memory planner (mtl_scale/plan/).

For LoRA the frozen base dominates memory, and ZeRO-3 re-gathers it in every forward and backward. So:
1. ZeRO-2, the frozen base replicated on every GPU, when base + activations + adapters fit;
2. else ZeRO-3 (the base partitioned over the world);
3. else ZeRO-3 with the base in nf4 (QLoRA), when only that fits;
4. else an error with each option's peak.
Gradient surgery, its telemetry and soft coupling work on ZeRO-3's gradient partitions (engine.py); with
any of them ZeRO-2 is not considered. The options are the shipped ds_configs/zero2.json and zero3.json.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from mtl_scale.config import RunConfig
from mtl_scale.errors import UserError
from mtl_scale.plan.estimate import GiB, estimate
from mtl_scale.plan.shape import ModelShape, load_model_config, model_shape

log = logging.getLogger(__name__)

AUTO = "auto"
SHIPPED = {2: "ds_configs/zero2.json", 3: "ds_configs/zero3.json"}


@dataclass
class StageChoice:
    deepspeed_config: str
    """The shipped DeepSpeed JSON chosen."""
    zero_stage: int
    quantization: str
    reason: str
    peaks_gib: dict[str, float]
    """Each option tried, in order, and the planner's peak per GPU for it."""

    def apply(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with the chosen DeepSpeed JSON (and quantisation)."""
        return dataclasses.replace(cfg, deepspeed_config=self.deepspeed_config,
                                   model=dataclasses.replace(cfg.model, quantization=self.quantization))


def needs_zero3(cfg: RunConfig) -> str | None:
    """Why this run needs ZeRO-3's gradient partitions (the trainer refuses the others), or None."""
    if cfg.surgery.method != "sum":
        return f"surgery.method={cfg.surgery.method}"
    if cfg.surgery.telemetry and cfg.sharing != "soft":
        return "surgery.telemetry"
    if cfg.soft.coupling:
        return "soft.coupling"
    return None


def choose_stage(cfg: RunConfig, shape: ModelShape, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
                 device: str = "cuda") -> StageChoice:
    """The first option that fits (see the module docstring), with the reason in words."""
    from mtl_scale.plan.cli import build_parser, inputs_from_config  # plan.cli imports this module

    args = build_parser().parse_args(["--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node),
                                      "--gpu-memory", str(gpu_memory_gib)])
    zero3_only = needs_zero3(cfg)
    options = ([] if zero3_only else [(2, cfg.model.quantization)]) + [(3, cfg.model.quantization)]
    if cfg.model.quantization == "none":
        options.append((3, "nf4"))
    peaks = {}
    for stage, quant in options:
        trial = dataclasses.replace(cfg, deepspeed_config=SHIPPED[stage],
                                    model=dataclasses.replace(cfg.model, quantization=quant))
        inp = dataclasses.replace(inputs_from_config(trial, shape, args), device=device)
        peak = estimate(shape, inp).peak
        peaks[_label(stage, quant)] = round(peak / GiB, 1)
        if peak <= gpu_memory_gib * GiB:
            return StageChoice(SHIPPED[stage], stage, quant,
                               _reason(stage, quant, peaks, gpu_memory_gib, nodes * gpus_per_node, zero3_only),
                               peaks)
    tried = ", ".join(f"{k} {v} GiB" for k, v in peaks.items())
    raise UserError(f"deepspeed_config=auto: no ZeRO stage fits {gpu_memory_gib:g} GiB per GPU at world size "
                    f"{nodes * gpus_per_node} ({tried}); lower micro_batch_size, max_seq_len or batching.max_tokens, turn on "
                    "model.gradient_checkpointing, use more GPUs, or see mtl-plan (launch/plan.py) for offload options")


def choose_for_ranks(cfg: RunConfig, model_path: str, rank: int, world: int) -> RunConfig:
    """``cfg`` with the stage chosen for this world, the same on every rank (a collective): the choice is made
    for the smallest device memory of any rank. Rank 0 logs it and why."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = torch.tensor([local_memory_gib(device)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MIN)
    local = min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    shape = model_shape(*load_model_config(model_path, cfg.model.trust_remote_code))
    choice = choose_stage(cfg, shape, max(1, world // local), local, float(memory), device)
    if rank == 0:
        log.info("deepspeed_config auto: %s (%s)", choice.deepspeed_config, choice.reason)
    return choice.apply(cfg)


def local_memory_gib(device: str) -> float:
    """Memory of this rank's device: the GPU's, or on CPU ranks the host's share (total / local ranks)."""
    if device == "cuda":
        import torch
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB / local


def _label(stage: int, quant: str) -> str:
    return f"ZeRO-{stage}" + (f" + {quant}" if quant != "none" else "")


def _reason(stage: int, quant: str, peaks: dict[str, float], memory: float, world: int, zero3_only: str | None) -> str:
    chosen = _label(stage, quant)
    fits = f"{chosen} needs {peaks[chosen]} GiB per GPU of {memory:g} GiB"
    if stage == 2:
        return (f"{chosen}, the frozen base replicated on every GPU: {fits}, and ZeRO-3 would re-gather the base "
                f"in every forward and backward" + (" (and saves nothing at world size 1)" if world == 1 else ""))
    why = [f"{zero3_only} works on ZeRO-3's gradient partitions, so ZeRO-2 was not tried"] if zero3_only else []
    too_big = [f"{k} needs {v} GiB" for k, v in peaks.items() if k != chosen]
    if too_big:
        why.append(", ".join(too_big) + f", more than {memory:g} GiB")
    return f"{chosen}: {fits}; " + "; ".join(why)
