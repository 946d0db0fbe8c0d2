"""The command line of the memory planner (mtl_scale.plan.estimate): a run config and flags in, the plan out
as a table or JSON.

    python launch/plan.py --config configs/llama3_8b_8gpu.yaml --gpu-memory 80
    python launch/plan.py --model configs/models/llama-3.1-70b.json --nodes 2 --micro-batch-size 1 --json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

from mtl_scale.batching import largest_micro_batch
from mtl_scale.config import DTYPES, QUANTIZATION, RunConfig, load_config
from mtl_scale.errors import UserError
from mtl_scale.plan.shape import ModelShape, load_model_config, lora_targets, model_shape
from mtl_scale.plan.estimate import GiB, Plan, PlanInputs, adapter_and_frozen_sizes, plan

# DeepSpeed's spellings of data_types.grad_accum_dtype and communication_data_type (runtime/config.py)
DS_DTYPES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
             "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
             "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16"}
OFFLOADS = ("none", "optimizer", "optimizer+params")
ATTENTION = ("sdpa", "sdpa_varlen", "eager", "flash_attention_2")


# ---------------------------------------------------------------------------------------------
# Output


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2 ** 20:.1f} MiB"


def _deepspeed_formula(inp: PlanInputs) -> str:
    """What DeepSpeed's estimator counts on the GPU, in its own terms (stage3.py / stage_1_and_2.py)."""
    if inp.zero_stage == 3:
        states = ("" if inp.offload_params else " + 2 B x N / W (16-bit params)" if inp.offload_optimizer
                  else " + 18 B x N / W")
        return "4 B x the largest LoRA matrix" + states
    return "2 B x N (16-bit params, whole)" + ("" if inp.offload_optimizer else " + 18 B x N / W")


def render(result: Plan) -> str:
    inp, sh = result.inputs, result.shape
    off = "optimizer+params" if inp.offload_params else "optimizer" if inp.offload_optimizer else "none"
    ranks = sorted(set(inp.adapter_ranks))
    lines = [
        f"model: {sh.architecture} from {sh.source}: {sh.total_params:,} parameters; largest module "
        f"{sh.largest_module[0]} ({sh.largest_module[1]:,})",
        f"world: {inp.nodes} node(s) x {inp.gpus_per_node} GPUs = {inp.world}, ZeRO-{inp.zero_stage}, offload {off}, "
        f"{inp.dtype}, quantization {inp.quantization}",
        f"LoRA, sharing={inp.sharing}: {len(inp.adapter_ranks)} adapter(s) of rank {'/'.join(map(str, ranks))} on "
        f"{','.join(inp.lora_targets)}: {sum(result.lora_params):,} trainable parameters",
        f"micro-batch {inp.micro_batch_size} x {inp.seq_len} tokens, {inp.attn_implementation} attention, gradient "
        f"checkpointing {'on' if inp.gradient_checkpointing else 'off'}", ""]
    width = max(len(c.name) for c in result.components) + 2
    lines.append(f"{'component':<{width}}{'per GPU':>12}  note")
    for c in result.components:
        where = "  [CPU]" if c.device == "cpu" else ""
        lines.append(f"{c.name:<{width}}{_size(c.bytes):>12}  {c.note}{where}")
    lines.append(f"{'total on the GPU':<{width}}{_size(result.gpu_total):>12}")
    if result.load_peak:
        lines.append(f"{'at load (4-bit, whole)':<{width}}{_size(result.load_peak):>12}  transformers loads a "
                     "quantized model without zero.Init: each rank holds all of it until deepspeed.initialize "
                     "partitions it")
    if result.surgery_peak:
        lines.append(f"{'at the surgery':<{width}}{_size(result.surgery_peak):>12}  after the last backward: the "
                     f"task-gradient copies, their differences and float64 copies for the Gram matrix")
    if result.cpu_total:
        lines.append(f"{'offloaded to CPU':<{width}}{_size(result.cpu_total):>12}  per GPU; "
                     f"x {inp.gpus_per_node} per node")
    ds = result.deepspeed_estimate
    if ds.get("estimator"):
        ours = result.group("LoRA parameters", "LoRA gradients", "optimizer states")
        estimator = ds["estimator"].rsplit(".", 1)[-1]
        lines += ["", f"LoRA model states per GPU: ours {_size(ours)}; DeepSpeed's {estimator}: "
                      f"{_size(ds['lora_gpu_bytes'])} ({_deepspeed_formula(inp)})",
                  f"(the same estimator for full fine-tuning of all {sh.total_params:,} parameters: "
                  f"{_size(ds['full_finetune_gpu_bytes'])} per GPU — it does not apply to a frozen base)"]
    headroom = inp.gpu_memory_gib * GiB - result.peak
    lines += ["", f"fits in {inp.gpu_memory_gib:g} GiB: {'yes' if result.fits else 'no'} "
                  f"(headroom {headroom / GiB:+.1f} GiB)"]
    lines += [f"  - {s}" for s in result.suggestions]
    return "\n".join(lines)


def to_json(result: Plan) -> dict:
    return {
        "inputs": dataclasses.asdict(result.inputs),
        "model": {k: v for k, v in dataclasses.asdict(result.shape).items()
                  if k not in ("linears", "module_params", "other_param_numels")},
        "lora_params_per_adapter": result.lora_params,
        "components": [dataclasses.asdict(c) for c in result.components],
        "gpu_total_bytes": result.gpu_total, "load_peak_bytes": result.load_peak,
        "surgery_peak_bytes": result.surgery_peak, "peak_bytes": result.peak,
        "cpu_total_bytes": result.cpu_total,
        "gpu_memory_bytes": int(result.inputs.gpu_memory_gib * GiB), "fits": result.fits,
        "deepspeed_estimate": result.deepspeed_estimate, "suggestions": result.suggestions,
    }


# ---------------------------------------------------------------------------------------------
# Inputs: run config + flags


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="launch/plan.py", description="Per-GPU memory plan of a LoRA run under "
                                 "DeepSpeed ZeRO. Flags override the run config (--config); key=value overrides "
                                 "apply to the run config.")
    ap.add_argument("--config", help="YAML run config (model.*, lora.*, sharing, tasks, micro_batch_size, "
                                     "max_seq_len, deepspeed_config)")
    ap.add_argument("--model", help="checkpoint directory, config.json, or hub id (default: the config's model.path)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--zero-stage", type=int, help="0-3 (default: the config's deepspeed_config)")
    ap.add_argument("--offload", help=f"{' | '.join(OFFLOADS)} (default: the deepspeed_config's offload_* devices)")
    ap.add_argument("--dtype", help=" | ".join(DTYPES))
    ap.add_argument("--quantization", help=" | ".join(QUANTIZATION))
    ap.add_argument("--lora-r", type=int)
    ap.add_argument("--lora-targets", help="comma-separated module names, or all-linear")
    ap.add_argument("--adapters", type=int, help="number of task adapters K (soft: K; hybrid: shared + K)")
    ap.add_argument("--micro-batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--attn-implementation", help=" | ".join(ATTENTION))
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    return ap


def _allowed(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{flag}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _choice(flag: str, flag_value, key: str, cfg_value, allowed):
    """The flag's value if given, else the run config's; a bad one named by whichever gave it."""
    value = flag_value if flag_value is not None else cfg_value
    _allowed(flag if flag_value is not None else key, value, allowed)
    return value


def inputs_from_args(args: argparse.Namespace) -> tuple[ModelShape, PlanInputs]:
    """Run config (or defaults) first, flags over it; every bad value names its flag or key."""
    if args.config is None:  # defaults, one placeholder task, bf16 (this plans GPU runs)
        cfg = load_config(None, ["tasks=[{name: task, source: 'builtin:copy'}]", "model.dtype=bf16", *args.overrides])
    else:
        cfg = load_config(args.config, args.overrides)
    hf_config, source = load_model_config(args.model or cfg.model.path, cfg.model.trust_remote_code)
    shape = model_shape(hf_config, source)
    if cfg.deepspeed_config == "auto":  # what the run would choose (--zero-stage overrides it)
        from mtl_scale.stage_choice import SHIPPED, choose_stage
        if args.zero_stage is None:
            choice = choose_stage(cfg, shape, args.nodes, args.gpus_per_node, args.gpu_memory)
            print(f"deepspeed_config auto: {choice.deepspeed_config} ({choice.reason})")
            cfg = choice.apply(cfg)
        else:
            cfg = dataclasses.replace(cfg, deepspeed_config=SHIPPED[3 if args.zero_stage == 3 else 2])
    return shape, inputs_from_config(cfg, shape, args)


def inputs_from_config(cfg: RunConfig, shape: ModelShape, args: argparse.Namespace | None = None) -> PlanInputs:
    """PlanInputs of a run config, flags (``build_parser``'s namespace) over it."""
    args = args or build_parser().parse_args([])
    for flag in ("nodes", "gpus_per_node", "lora_r", "adapters", "micro_batch_size", "seq_len", "gpu_memory"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    dtype = _choice("--dtype", args.dtype, "model.dtype", cfg.model.dtype, DTYPES)
    quant = _choice("--quantization", args.quantization, "model.quantization", cfg.model.quantization, QUANTIZATION)
    attn = _choice("--attn-implementation", args.attn_implementation, "model.attn_implementation",
                   cfg.model.attn_implementation, ATTENTION)
    targets = cfg.lora.target_modules
    if args.lora_targets is not None:
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not targets:
        raise UserError("--lora-targets is empty; name modules (q_proj,v_proj) or all-linear")
    lora_targets(shape, targets)  # unknown target names fail here, with the model's Linear names
    if args.adapters and cfg.sharing == "hard":
        raise UserError("--adapters sets the number of per-task adapters; sharing=hard has one shared adapter. "
                        "Use sharing=soft or sharing=hybrid (a key=value override) or leave --adapters out")
    r, k = args.lora_r or cfg.lora.r, args.adapters or len(cfg.tasks)
    ranks = {"hard": [r], "soft": [r] * k, "hybrid": [r] + [cfg.hybrid.task_r] * k}[cfg.sharing]
    zero = _deepspeed_settings(cfg, args.nodes * args.gpus_per_node, shape.hidden,
                               *adapter_and_frozen_sizes(shape, targets, ranks))
    if args.zero_stage is not None:
        _allowed("--zero-stage", args.zero_stage, (0, 1, 2, 3))
        zero["zero_stage"] = args.zero_stage
    if args.offload is not None:
        _allowed("--offload", args.offload, OFFLOADS)
        zero["offload_optimizer"], zero["offload_params"] = args.offload != "none", args.offload == "optimizer+params"
    if zero["offload_optimizer"] and zero["zero_stage"] == 0:
        raise UserError("--offload / offload_optimizer needs ZeRO stage 1, 2 or 3 (--zero-stage)")
    if zero["offload_params"] and zero["zero_stage"] != 3:
        raise UserError("--offload optimizer+params / offload_param needs ZeRO stage 3 (--zero-stage 3): DeepSpeed "
                        "offloads parameters only under ZeRO-3")

    # micro_batch_size x max_seq_len, or what batching.mode's token budget lets a micro-batch hold
    rows, row_len = largest_micro_batch(cfg)
    # as mtl_scale.trainer decides: surgery other than sum, or its telemetry, on the shared adapter
    surgery = cfg.surgery.method != "sum" or (cfg.surgery.telemetry and cfg.sharing != "soft")
    if surgery and zero["zero_stage"] != 3:
        raise UserError(f"surgery.method={cfg.surgery.method} / surgery.telemetry work on ZeRO-3's gradient "
                        f"partitions; this plan has ZeRO stage {zero['zero_stage']} (--zero-stage 3)")
    return PlanInputs(
        model=args.model or cfg.model.path, nodes=args.nodes, gpus_per_node=args.gpus_per_node, dtype=dtype,
        quantization=quant, lora_targets=targets, sharing=cfg.sharing, adapter_ranks=ranks,
        active_adapters=2 if cfg.sharing == "hybrid" else 1, lora_dropout=cfg.lora.dropout,
        micro_batch_size=args.micro_batch_size or rows, seq_len=args.seq_len or row_len,
        gradient_checkpointing=(cfg.model.gradient_checkpointing if args.gradient_checkpointing is None
                                else args.gradient_checkpointing),
        attn_implementation=attn, task_gradient_copies=cfg.sampling.tasks_per_step if surgery else 0,
        gpu_memory_gib=args.gpu_memory, **zero)


def _deepspeed_settings(cfg: RunConfig, world: int, hidden: int, lora_sizes: list[int],
                        frozen_sizes: list[int]) -> dict:
    """PlanInputs' DeepSpeed fields from the run config's DeepSpeed JSON ("auto" filled as the trainer
    fills it; a key left out takes DeepSpeed's default, runtime/zero/config.py)."""
    from mtl_scale.ds_config import build_ds_config, resolve_path, zero_stage
    ds = build_ds_config(cfg, world, hidden, lora_sizes, frozen_sizes)
    zero = ds.get("zero_optimization", {})

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    def dtype(key: str, value) -> str | None:
        if value is None:
            return None
        if str(value).lower() not in DS_DTYPES:
            raise UserError(f"{resolve_path(cfg.deepspeed_config)}: {key}={value!r} is not a dtype DeepSpeed "
                            f"knows; choose one of: {', '.join(DTYPES)}")
        return DS_DTYPES[str(value).lower()]

    return dict(
        zero_stage=zero_stage(ds), offload_optimizer=offloaded("offload_optimizer"),
        offload_params=offloaded("offload_param"),
        reuse_distance=int(zero.get("stage3_max_reuse_distance", 1e9)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 5e7)),
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 1e5)),
        reduce_bucket=int(zero.get("reduce_bucket_size", 5e8)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        # DeepSpeed's default is True for ZeRO-3 only, where it does not change the (single) reduce bucket
        overlap_comm=bool(zero.get("overlap_comm", False)),
        grad_accum_dtype=dtype("data_types.grad_accum_dtype", ds.get("data_types", {}).get("grad_accum_dtype")),
        communication_dtype=dtype("communication_data_type", ds.get("communication_data_type")))


def main(argv: list[str] | None = None) -> Plan:
    args = build_parser().parse_intermixed_args(argv)
    # DeepSpeed's logger writes to the sys.stdout of its import: send it, and anything else printed while
    # planning, to stderr, so that stdout holds only the plan (--json parseable)
    with contextlib.redirect_stdout(sys.stderr):
        shape, inp = inputs_from_args(args)
        result = plan(shape, inp)
    print(json.dumps(to_json(result), indent=2) if args.json else render(result))
    return result


def cli() -> None:
    """The ``mtl-plan`` command (and launch/plan.py)."""
    from mtl_scale.cli import run_entry
    run_entry(main)
