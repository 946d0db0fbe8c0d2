"""One throughput measurement on the ranks the launcher started: mtl_scale's product path (``--stack
ours``) or the usual Hugging Face stack (``--stack hf``; ``hf-grouped`` with the Trainer's length-grouped
sampler; ``trl-packed``, TRL's SFTTrainer with packing), for ``max_steps`` optimizer steps of which the
first ``--warmup`` are not timed. Rank 0 prints one ``THROUGHPUT_RESULT {json}`` line.
Started by bench.throughput, which compares the stacks; by hand, from the repository root:

    deepspeed --num_gpus 2 --module bench.throughput_worker --stack hf --warmup 5 max_steps=35 [key=value ...]

Both stacks get the same run config (configs/demo.yaml + overrides), hence the same model, LoRA,
token ids and DeepSpeed dict (``mtl_scale.ds_config.build_ds_config``). A step is timed from one
optimizer step's end to the next, so batch assembly and everything else in the loop counts; tokens
are the non-padding tokens (attention-mask sum; packed: token-mask sum) of the micro-batches run in those
steps, all ranks, and the pad fraction is the share of the positions computed that are padding.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import RESULT_TAG, flops_per_token, window
from mtl_scale import adapters
from mtl_scale.cli import run_entry
from mtl_scale.config import RunConfig, load_config


class StepClock:
    """Step-end marks of this rank: (time, tokens so far, sequences so far)."""

    def __init__(self):
        self.marks: list[tuple[float, int, int]] = []
        self.positions: list[int] = []
        """Positions computed (real tokens and padding) so far, at each mark: the pad fraction's denominator."""
        self._masks: list[torch.Tensor] = []
        self.after_warmup: tuple[int, Callable[[], None]] | None = None  # (warm-up steps, called after them)

    def count(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> None:
        """One micro-batch the model is fed: padded (attention_mask), packed (position_ids restarting per
        example, token_mask marking mtl_scale's row padding) or padding-free (position_ids only)."""
        # Summed at the next mark: no host sync per micro-batch on a GPU.
        real = attention_mask if attention_mask is not None else \
            token_mask if token_mask is not None else torch.ones_like(input_ids)
        examples = real[:, 0] if position_ids is None or attention_mask is not None else \
            ((position_ids == 0) & (real > 0))
        self._masks.append(torch.stack([real.sum(), examples.sum(), torch.tensor(input_ids.numel())]))

    def mark(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels are done before the clock is read
        now = time.perf_counter()
        tokens, sequences = self.marks[-1][1:] if self.marks else (0, 0)
        positions = self.positions[-1] if self.positions else 0
        for m in self._masks:
            tokens, sequences, positions = tokens + int(m[0]), sequences + int(m[1]), positions + int(m[2])
        self._masks.clear()
        self.positions.append(positions)
        self.marks.append((now, tokens, sequences))
        if self.after_warmup and len(self.marks) == self.after_warmup[0]:  # the timed window starts here
            self.after_warmup[1]()


def describe(model, sharing: str, tasks: list[str]) -> dict:
    """Parameter counts (ZeRO-3's full sizes, not the local partitions) and what is partitioned."""
    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    embedding = model.get_input_embeddings().weight
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    frozen = [(n, p) for n, p in named if not p.requires_grad and hasattr(p, "ds_numel")]
    # One task's forward runs its own adapters only (soft: 1 of K): that is what costs FLOPs per token.
    active = adapters.adapters_for_task(sharing, tasks[0]) if sharing != "hf" else None
    active_params = sum(numel(p) for n, p in trainable
                        if active is None or any(f".lora_A.{a}." in n or f".lora_B.{a}." in n for a in active))
    config = model.config
    return {
        "trainable_params": sum(numel(p) for _, p in trainable),
        "only_lora_trainable": all("lora_" in n for n, _ in trainable),
        "frozen_params": sum(numel(p) for _, p in named if not p.requires_grad and p is not embedding),
        "active_trainable_params": active_params,
        "all_params_zero3": all(hasattr(p, "ds_numel") for _, p in named),
        # ~1/world when ZeRO-3 really shards the frozen base across the ranks
        "base_local_fraction": sum(p.ds_tensor.numel() for _, p in frozen) / max(1, sum(p.ds_numel for _, p in frozen)),
        "n_layers": config.num_hidden_layers, "hidden": config.hidden_size,
    }


def accelerate_deepspeed_on_cpu() -> None:
    """Let the HF stack run DeepSpeed on CPU ranks, as mtl_scale does. accelerate recognises a
    DeepSpeed launch only on an accelerator (GPU, NPU, ...); without one it finds no backend and runs
    each rank as a world of one. Tell it the ranks talk over gloo; everything after that (DeepSpeed's
    init_distributed, the DeepSpeed engine) is accelerate's own code path. Not applied on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_CPU)


def measure_ours(cfg: RunConfig, clock: StepClock) -> tuple[dict, object]:
    """The trainer's loop body (mtl_scale.trainer.train_loop) without evaluation, logging and checkpoints."""
    from mtl_scale.telemetry import reduce_stats
    from mtl_scale.trainer import activator, setup, step_task_weights, train_step, update_balancer

    run = setup(cfg)
    activate = activator(run)
    run.engine.train()
    controller = []  # seconds per step in the adaptive controller itself (its update and DWA's weights)
    for step in range(cfg.max_steps):
        groups, stats = train_step(run, step, activate)  # the very step train_loop takes
        for _, micro_batches in groups:
            for mb in micro_batches:
                clock.count(mb["input_ids"], mb.get("attention_mask"), mb.get("position_ids"), mb.get("token_mask"))
        metrics = reduce_stats(run, stats)  # the per-step metrics all-reduce every training step does
        if run.balancer is not None:  # adaptive sampling / DWA: the controller's update, as train_loop runs it
            t0 = time.perf_counter()
            update_balancer(run, metrics)
            step_task_weights(run)  # what step_loss_scales computes once per step
            controller.append(time.perf_counter() - t0)
        clock.mark()
    info = describe(run.model, cfg.sharing, list(run.tasks))
    info.update(zero_stage=run.engine.zero_optimization_stage(), built_under_zero_init=None,
                persistence_threshold=run.engine.zero_param_persistence_threshold(),
                controller_s=statistics.median(controller) if controller else None)
    return info, run.engine.device


def count_forward(model, clock: StepClock) -> None:
    """Count what the model is actually fed (a DataLoader may fetch ahead of the step it belongs to)."""
    model.register_forward_pre_hook(
        lambda _m, _a, kw: clock.count(kw["input_ids"], kw.get("attention_mask"), kw.get("position_ids")),
        with_kwargs=True)


def measure_hf(cfg: RunConfig, clock: StepClock, group_by_length: bool = False,
               trl_packing: bool = False) -> tuple[dict, object]:
    """What people do by hand: one shuffled dataset of every task's examples, ``Trainer`` + PEFT,
    ``TrainingArguments(deepspeed=...)`` with the very dict mtl_scale would use. ``group_by_length``:
    the Trainer's length-grouped sampler. ``trl_packing``: TRL's ``SFTTrainer`` with ``packing=True``
    (its default best-fit-decreasing packing, padding-free) instead, rows of ``batching.row_tokens`` and
    as many per micro-batch as fit ``batching.max_tokens``: the same token budget as mtl_scale's packed."""
    import datasets
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.integrations import is_deepspeed_zero3_enabled

    from mtl_scale.data.formatting import IGNORE, collate
    from mtl_scale.data.prepare import prepare_tasks
    from mtl_scale.ds_config import build_ds_config, gradient_accumulation_steps
    from mtl_scale.model import DTYPES, load_tokenizer, resolve_model_path
    from mtl_scale.plan.shape import model_shape
    from mtl_scale.plan.estimate import adapter_and_frozen_sizes

    if not torch.cuda.is_available():
        accelerate_deepspeed_on_cpu()
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    tasks = prepare_tasks(cfg, tokenizer)  # the identical token ids and completion-only labels
    # the dict mtl_scale builds, its "auto" persistence threshold from the same LoRA sizes (hard: one adapter)
    shape = model_shape(AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code))
    ds_config = build_ds_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), shape.hidden,
                                *adapter_and_frozen_sizes(shape, cfg.lora.target_modules, [cfg.lora.r]))
    # as mtl_scale.model.load_model does it (non-reentrant: frozen embeddings need no input grads)
    checkpointing = ({"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
                     if cfg.model.gradient_checkpointing else {})
    args_class, extra, batch = TrainingArguments, {}, cfg.micro_batch_size
    if group_by_length:  # transformers 5's name for TrainingArguments(group_by_length=True)
        extra = {"train_sampling_strategy": "group_by_length"}
    if trl_packing:
        from trl import SFTConfig
        from mtl_scale.batching import row_tokens
        args_class, batch = SFTConfig, max(1, cfg.batching.max_tokens // row_tokens(cfg))
        extra = {"packing": True, "max_length": row_tokens(cfg), "completion_only_loss": True}
    args = args_class(
        output_dir=tempfile.mkdtemp(prefix="hf_throughput_"), deepspeed=ds_config, **extra,
        per_device_train_batch_size=batch, gradient_accumulation_steps=gradient_accumulation_steps(cfg),
        max_steps=cfg.max_steps, learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps, seed=cfg.seed,
        bf16=cfg.model.dtype == "bf16", fp16=cfg.model.dtype == "fp16",
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=cfg.max_steps, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, label_names=["labels"], **checkpointing)
    # TrainingArguments holds an HfDeepSpeedConfig now, so from_pretrained builds under zero.Init.
    if not is_deepspeed_zero3_enabled():
        raise RuntimeError("TrainingArguments did not enable ZeRO-3: the base would load whole on every rank")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.model.dtype],
                                                 attn_implementation=cfg.model.attn_implementation,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    built_under_zero_init = all(hasattr(p, "ds_id") for p in model.parameters())
    model.config.use_cache = False  # as mtl_scale does: a KV cache is only overhead in training
    targets = "all-linear" if cfg.lora.target_modules == ["all-linear"] else list(cfg.lora.target_modules)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        task_type="CAUSAL_LM", bias="none"))
    rows = [{"input_ids": ids, "labels": labels}
            for data in tasks.values() for ids, labels in zip(data.train.input_ids, data.train.labels)]
    count_forward(model, clock)

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.mark()

    if trl_packing:  # pre-tokenised: TRL packs input_ids and builds the labels from completion_mask
        from trl import SFTTrainer
        rows = [{"input_ids": r["input_ids"], "completion_mask": [int(x != IGNORE) for x in r["labels"]]}
                for r in rows]
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Clock()])
    else:
        trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          data_collator=lambda feats: collate([(f["input_ids"], f["labels"]) for f in feats],
                                                              tokenizer.pad_token_id),
                          callbacks=[Clock()])
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)  # nothing is saved there (save_strategy="no")
    info = describe(model, "hf", list(tasks))
    info.update(zero_stage=trainer.model_wrapped.zero_optimization_stage(), built_under_zero_init=built_under_zero_init,
                persistence_threshold=trainer.model_wrapped.zero_param_persistence_threshold())
    return info, trainer.args.device


def timed_window_profilers(stem: str) -> list[tuple[Callable[[], None], Callable[[], None]]]:
    """(start, stop) pairs for rank 0's timed steps: cProfile (python -m bench.throughput --profile DIR:
    DIR/<stem>-<n>.prof) and torch.profiler (--kernel-profile DIR: the kernels and operators, host and GPU;
    DIR/<stem>-<n>.json, a Chrome trace, and DIR/<stem>-<n>.txt, the operators by self time)."""
    out = []
    if os.environ.get("MTL_SCALE_PROFILE"):
        import cProfile
        stats = _numbered(Path(os.environ["MTL_SCALE_PROFILE"]), stem, ".prof")
        profiler = cProfile.Profile()
        out.append((profiler.enable, lambda: (profiler.disable(), profiler.dump_stats(stats))))
    if os.environ.get("MTL_SCALE_KERNEL_PROFILE"):
        trace = _numbered(Path(os.environ["MTL_SCALE_KERNEL_PROFILE"]), stem, ".json")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        kernels = torch.profiler.profile(activities=activities)

        def stop() -> None:
            kernels.stop()
            kernels.export_chrome_trace(str(trace))
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            trace.with_suffix(".txt").write_text(kernels.key_averages().table(sort_by=sort, row_limit=60) + "\n")
        out.append((kernels.start, stop))
    return out


def _numbered(directory: Path, stem: str, suffix: str) -> Path:
    """directory/<stem>-<n><suffix>, n the launches of that stem already there."""
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{stem}-{len(list(directory.glob(f'{stem}-*{suffix}')))}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stack", choices=["ours", "hf", "hf-grouped", "trl-packed"], required=True)
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/demo.yaml", args.overrides)
    clock = StepClock()
    measure = {"ours": measure_ours, "hf": measure_hf,
               "hf-grouped": lambda c, k: measure_hf(c, k, group_by_length=True),
               "trl-packed": lambda c, k: measure_hf(c, k, trl_packing=True)}[args.stack]
    profilers = timed_window_profilers(f"{args.stack}-{cfg.sharing}") if int(os.environ.get("RANK", "0")) == 0 else []
    clock.after_warmup = (args.warmup, lambda: [start() for start, _ in profilers])  # the timed steps only
    info, device = measure(cfg, clock)
    for _, stop in profilers:
        stop()
    if len(clock.marks) != cfg.max_steps:
        raise RuntimeError(f"{args.stack}: {len(clock.marks)} optimizer steps seen, expected {cfg.max_steps}")
    w = window(clock.marks, args.warmup)
    # All ranks' tokens and sequences; the slowest rank's time (they wait for each other at every step anyway).
    totals = torch.tensor([w["tokens"], w["sequences"]], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    elapsed = torch.tensor([w["elapsed"]], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    tokens, sequences = int(totals[0]), int(totals[1])
    # Positions the model computed in the timed window, all ranks: real tokens plus padding.
    positions = torch.tensor([float(clock.positions[-1] - clock.positions[args.warmup - 1])], dtype=torch.float64,
                             device=device)
    torch.distributed.all_reduce(positions)
    positions = float(positions)
    if torch.distributed.get_rank() == 0:
        on_cuda = torch.cuda.is_available()
        result = {
            "stack": args.stack, "sharing": cfg.sharing, "world": torch.distributed.get_world_size(),
            "device": "cuda" if on_cuda else "cpu",
            "device_name": torch.cuda.get_device_name() if on_cuda else "cpu", "dtype": cfg.model.dtype,
            "threads": torch.get_num_threads(), "steps": len(w["step_times"]), "tokens": tokens,
            "elapsed_s": float(elapsed), "tokens_per_s": tokens / float(elapsed),
            "step_time_s": statistics.median(w["step_times"]),
            "tokens_per_sequence": tokens / sequences,
            "pad_fraction": 1 - tokens / positions,
            "flops_per_token": flops_per_token(info["frozen_params"], info["active_trainable_params"],
                                               info["n_layers"], info["hidden"], tokens / sequences),
            **info,
        }
        print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    run_entry(main)
