"""The run: set up ranks, data, model and DeepSpeed engine; loop over optimizer steps; save adapters.

    run = setup(cfg)      # collective: every rank calls it
    train_loop(run)       # saves the adapters at the last step, before the final evaluation
    finish(run)           # summary and report
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from mtl_scale import adapters, batching, checkpoint, kernels, shared_fs, stage_choice, zero3_adapters
from mtl_scale.balancing import DEFAULT_ETA, Balancer, BalancerConfig, reference_losses
from mtl_scale.config import RunConfig, to_dict
from mtl_scale.data.formatting import completion_tokens, passes_keywords, takes_logits_to_keep
from mtl_scale.data.prepare import TaskData, data_summary, prepare_tasks
from mtl_scale.ds_config import build_ds_config, gradient_accumulation_steps, zero_stage
from mtl_scale.engine import Coupling, StepStats, Surgery, optimizer_step
from mtl_scale.evaluate import evaluate_during_training
from mtl_scale.loss_weighting import loss_scales
from mtl_scale.model import base_model_record, load_model, load_tokenizer, resolve_model_path
from mtl_scale.process_group import init_distributed
from mtl_scale.errors import TrainingAborted, UserError
from mtl_scale.sampling import TaskSampler, task_probabilities
from mtl_scale.telemetry import reduce_stats, surgery_metrics

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: RunConfig
    rank: int
    world: int
    model_path: str
    tokenizer: object
    tasks: dict[str, TaskData]
    model: object  # the PeftModel (parameters partitioned under ZeRO-3)
    engine: object
    sampler: TaskSampler
    ds_config: dict
    hf_ds_config: object = None  # keeps transformers' ZeRO-3 integration alive for the run
    surgery: Surgery | None = None
    coupling: Coupling | None = None
    balancer: Balancer | None = None
    """The adaptive controller (sampling.strategy=adaptive, loss.task_weighting=dwa), else None."""
    resume_from: Path | None = None
    """The checkpoint every rank agreed to resume from (``resume``), restored by ``train``."""
    step: int = 0
    history: list[dict] = field(default_factory=list)
    micro_batches_seen: dict[str, int] = field(default_factory=dict)
    examples_seen: dict[str, int] = field(default_factory=dict)
    adapter_params: dict[str, list] = field(default_factory=dict)
    """Adapter name -> its trainable parameters (filled on first use)."""
    batchers: dict[str, object] = field(default_factory=dict)
    """Task -> how batching.mode grouped/packed cuts its shard's epochs into micro-batches (first use)."""
    consecutive_skips: int = 0
    stop_requested: bool = False
    """Set by SIGTERM; acted on (checkpoint, exit 0) at the end of the step, on every rank together."""
    preempted: bool = False
    adapters_saved_step: int = -1
    """The step whose adapters are on disk (saved before the final evaluation; finish() then skips them)."""

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def adapter_names(self) -> list[str]:
        return adapters.adapter_names(self.cfg.sharing, list(self.tasks))


class LrSchedule:
    """Multiplier of ``cfg.lr`` at optimizer step s: linear warmup over ``warmup_steps``, then constant, or
    cosine / linear decay to 10% at step ``horizon``, and 10% after it.

    ``horizon`` is the ``max_steps`` of the run that started the schedule, and it stays so on resume: this is
    a callable object rather than a closure because LambdaLR's state_dict keeps a callable object's
    ``__dict__`` (and drops a function), so the horizon travels in DeepSpeed's checkpoint and
    load_state_dict puts it back. A run resumed with a larger ``max_steps`` therefore continues the LR curve
    it was on and trains its extra steps at the 10% floor; a smaller one stops before the curve's end.
    """

    def __init__(self, warmup_steps: int, schedule: str, horizon: int):
        self.warmup_steps, self.schedule, self.horizon = warmup_steps, schedule, horizon

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.horizon - self.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return 0.1 + 0.9 * decay


def lr_lambda(cfg: RunConfig) -> LrSchedule:
    """A fresh run's schedule: its horizon is ``cfg.max_steps``."""
    return LrSchedule(cfg.warmup_steps, cfg.lr_schedule, cfg.max_steps)


def setup(cfg: RunConfig, model_loader: Callable | None = None) -> Run:
    """Everything a run needs, on every rank: data, the process group, the model with its adapters, the
    DeepSpeed engine, the sampler. ``model_loader(model_cfg, path)``: how the base is loaded (default
    mtl_scale.model.load_model; a benchmark may wrap it to measure around the load)."""
    import deepspeed
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    # Everything that can fail on bad input happens before the process group exists.
    check_output_dir_path(cfg.output_dir)
    try:  # this rank's view only: a wrong resume is raised below, on every rank together
        local_resume = checkpoint.resolve_resume(cfg)
    except UserError as e:
        local_resume = e
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    tasks = prepare_tasks(cfg, tokenizer)
    balancer = make_balancer(cfg, {t: len(d.train) for t, d in tasks.items()})  # reads sampling.reference
    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    hidden = getattr(hf_config, "hidden_size", 1024)
    if cfg.model.liger_kernels:  # patches the architecture's classes: before the model is built
        kernels.apply_liger(hf_config.model_type, torch.cuda.is_available())

    rank, world = init_distributed(cfg.dist_timeout_s)
    # Before the heavy set-up and before anything is written or resumed: node-local output_dirs, or
    # ranks that found different checkpoints, would otherwise diverge and hang until dist_timeout_s.
    shared_fs.check_output_dir(cfg.output_dir, rank, world)
    resume_from = shared_fs.agree_on_resume(cfg.resume, local_resume, rank, world)
    if cfg.deepspeed_config == stage_choice.AUTO:  # the same choice on every rank (a collective)
        cfg = stage_choice.choose_for_ranks(cfg, model_path, rank, world)
    ds_config = build_ds_config(cfg, world, hidden)
    # Alive before from_pretrained: transformers then builds the model inside zero.Init, partitioned.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    model = (model_loader or load_model)(cfg.model, model_path)
    batching.check_flash_rows(cfg, model)
    names = adapters.adapter_names(cfg.sharing, list(tasks))
    model = adapters.attach_adapters(model, cfg.lora, names, cfg.seed,
                                     task_r=cfg.hybrid.task_r if cfg.sharing == "hybrid" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.model.quantization != "none" and rank == 0:
        n4 = sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"
                 for m in model.modules())
        log.info("base quantized: %d Linear4bit layers (%s, storage %s)", n4, cfg.model.quantization, cfg.model.dtype)
    if zero_stage(ds_config) == 3:
        # The "auto" persistence threshold depends on the LoRA matrices, which exist now.
        ds_config = build_ds_config(cfg, world, hidden, *zero3_adapters.matrix_sizes(model))
        zero3_adapters.mark_lora_leaves(model)  # one fetch per LoRA layer, the same module trace for every task
        if cfg.model.liger_kernels:
            kernels.gather_lm_head_for_fused_loss(model)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    if zero_stage(ds_config) == 3:
        zero3_adapters.skip_inactive_reductions(engine.optimizer, model)
        zero3_adapters.cache_parameter_lists(model)
        zero3_adapters.keep_persistent_gathered(engine.optimizer)
    sampler = TaskSampler({t: len(d.train) for t, d in tasks.items()}, cfg.sampling, cfg.seed, rank, world)
    if balancer is not None:
        sampler.probs = dict(balancer.probs)
    surgery, coupling = _surgery_and_coupling(cfg, model, names, zero_stage(ds_config))
    if rank == 0:
        log.info("world %d, ZeRO stage %d, sharing=%s, adapters %s, trainable parameters %d, batching %s",
                 world, zero_stage(ds_config), cfg.sharing, adapters.adapter_names(cfg.sharing, list(tasks)),
                 sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
                 batching.describe(cfg, model.config, engine.device))
    return Run(cfg, rank, world, model_path, tokenizer, tasks, model, engine, sampler, ds_config, hf_ds_config,
               surgery=surgery, coupling=coupling, balancer=balancer, resume_from=resume_from)


def check_output_dir_path(output_dir: str) -> None:
    """Refuse an ``output_dir`` that is a file, or lies under one: every write into it would fail, the first
    of them only mid-run."""
    path = Path(output_dir)
    for existing in (p for p in [path, *path.parents] if p.exists()):
        if not existing.is_dir():
            where = "is a file" if existing == path else f"lies under {existing}, which is a file"
            raise UserError(f"output_dir={output_dir!r} {where}, not a directory; give a directory for adapters, "
                            "checkpoints and metrics (it is created if missing)")
        return


def make_balancer(cfg: RunConfig, sizes: dict[str, int]) -> Balancer | None:
    """The controller of adaptive sampling and DWA loss weights, or None when neither is configured."""
    adaptive, dwa = cfg.sampling.strategy == "adaptive", cfg.loss.task_weighting == "dwa"
    a = cfg.sampling.adaptive
    gap = adaptive and a.rule == "gap"
    # e.g. the demo's config with sampling.strategy=temperature on top. Logged by the launcher's rank 0 only:
    # this runs before the process group exists.
    if cfg.sampling.reference and not gap and os.environ.get("RANK", "0") == "0":
        log.warning("sampling.reference is ignored: only sampling.strategy=adaptive with sampling.adaptive.rule=gap "
                    "reads it (here strategy=%s, rule=%s)", cfg.sampling.strategy, a.rule)
    if not (adaptive or dwa):
        return None
    return Balancer(list(sizes), task_probabilities(sizes, cfg.sampling), BalancerConfig(
        rule=a.rule if adaptive else None, eta=DEFAULT_ETA[a.rule] if a.eta is None else a.eta, floor=a.floor,
        every_steps=a.every_steps, ema_decay=a.ema_decay,
        reference=reference_losses(cfg.sampling.reference, list(sizes)) if gap else {},
        dwa_temperature=cfg.loss.dwa.temperature if dwa else None, dwa_ema_decay=cfg.loss.dwa.ema_decay))


def _surgery_and_coupling(cfg: RunConfig, model, names: list[str], stage: int):
    """Which parameters surgery and the soft coupling act on; both work on ZeRO-3's local shards."""
    needs_shards = cfg.surgery.method != "sum" or (cfg.surgery.telemetry and cfg.sharing != "soft") or cfg.soft.coupling
    if needs_shards and stage != 3:
        raise UserError(f"surgery.method={cfg.surgery.method} / surgery.telemetry / soft.coupling work on ZeRO-3's "
                        f"gradient partitions; deepspeed_config {cfg.deepspeed_config} has ZeRO stage {stage}")
    surgery = coupling = None
    if cfg.surgery.method != "sum" or (cfg.surgery.telemetry and cfg.sharing != "soft"):
        shared = list(adapters.lora_parameters(model, adapters.SHARED).values())
        surgery = Surgery(cfg.surgery.method, shared, cfg.seed)
    if cfg.soft.coupling:
        per_adapter = [adapters.trainable(adapters.lora_parameters(model, name)) for name in names]
        groups = [[per_adapter[i][adapters.rename_adapter_key(key, names[0], name)] for i, name in enumerate(names)]
                  for key in per_adapter[0]]
        coupling = Coupling(cfg.soft.coupling, groups)
        if not cfg.lora.shared_a and torch.distributed.get_rank() == 0:
            log.warning("soft.coupling without lora.shared_a pulls A and B toward their means separately, not the "
                        "updates B·A: merged adapters keep cross terms. lora.shared_a=true couples B over one A")
    return surgery, coupling


def activator(run: Run):
    """Task -> make the LoRA layers apply its adapters. Hard sharing: always the same, nothing to do."""
    if run.cfg.sharing == "hard":
        return lambda task: None
    layers = adapters.tuner_layers(run.model)
    return lambda task: adapters.activate(run.model, adapters.adapters_for_task(run.cfg.sharing, task), layers)


def next_step_groups(run: Run, step: int, micro_batch_size: int | None = None):
    """The step's (task, [micro-batch, ...]) groups: rank-identical tasks, this rank's examples.
    ``batching.mode`` decides which examples share a micro-batch and their layout, never how many
    micro-batches the step has. ``micro_batch_size``: examples per padded micro-batch, the config's by
    default (bench/memory_check.py measures several in one run)."""
    padded = run.cfg.batching.mode == "padded"
    if micro_batch_size is not None and not padded:
        raise ValueError(f"micro_batch_size={micro_batch_size} sizes padded micro-batches; batching.mode="
                         f"{run.cfg.batching.mode} cuts them by batching.max_tokens")
    groups = []
    for task, n_micro in run.sampler.plan(step):
        data = run.tasks[task].train
        micro_batches = []
        for _ in range(n_micro):
            if padded:
                idx = run.sampler.take(task, micro_batch_size or run.cfg.micro_batch_size)
            else:
                if task not in run.batchers:
                    run.batchers[task] = batching.batcher(run.cfg, [len(ids) for ids in data.input_ids],
                                                          run.model.config)
                idx = run.sampler.take_batch(task, run.batchers[task])
            micro_batches.append(batching.collate(run.cfg, [(data.input_ids[i], data.labels[i]) for i in idx],
                                                  run.tokenizer.pad_token_id))
        groups.append((task, micro_batches))
    return groups


def train_step(run: Run, step: int, activate: Callable[[str], None] | None = None,
               groups: list | None = None) -> tuple[list, StepStats]:
    """Optimizer step ``step`` of the run, exactly as training takes it: the step's task groups, their loss
    scales, the adapters the step leaves untouched, the surgery and coupling of the run, one
    ``engine.optimizer_step``. Returns the groups and this rank's StepStats (telemetry.reduce_stats sums them
    over ranks). The training loop, the benchmarks and the probes all step through here, so a benchmark times
    what training runs. ``activate``: the run's activator by default (a probe may wrap it); ``groups``:
    ``next_step_groups(run, step)`` by default (a benchmark may draw them with another micro-batch size)."""
    groups = groups if groups is not None else next_step_groups(run, step)
    stats = optimizer_step(run.engine, groups, activate or activator(run), step_loss_scales(run, groups),
                           run.surgery, run.coupling, step=step, absent=absent_parameters(run, groups),
                           loss_in_model=run.cfg.model.liger_kernels,
                           logits_at_labels=takes_logits_to_keep(run.model),
                           varlen_inputs=batching.per_example_attention(run.cfg) and passes_keywords(run.model))
    return groups, stats


def absent_parameters(run: Run, groups) -> list[torch.nn.Parameter]:
    """The trainable parameters of adapters no task of this step uses; the step leaves them untouched.

    Soft coupling is the exception: its regulariser pulls every adapter toward the mean each step,
    so with coupling every adapter takes part in every step.
    """
    if run.cfg.sharing == "hard" or run.coupling is not None:
        return []
    if not run.adapter_params:  # named_parameters() walks the whole model: once per run, not per step
        run.adapter_params = {n: list(adapters.trainable(adapters.lora_parameters(run.model, n)).values())
                              for n in run.adapter_names}
    used = {name for task, _ in groups for name in adapters.adapters_for_task(run.cfg.sharing, task)}
    return [p for name, params in run.adapter_params.items() if name not in used for p in params]


def step_task_weights(run: Run) -> dict[str, float]:
    """The task weights of this step's objective: DWA's from the controller, else ``loss.weights`` (manual)."""
    return run.balancer.loss_weights() if run.cfg.loss.task_weighting == "dwa" else run.cfg.loss.weights


def step_loss_scales(run: Run, groups) -> dict[str, float]:
    """Per-task loss scales for this step (loss_weighting.py), from completion-token counts summed
    over ranks: one all-reduce of K numbers before the step's first backward."""
    names = list(run.tasks)
    local = {t: 0 for t in names}
    for task, micro_batches in groups:
        local[task] += sum(completion_tokens(mb) for mb in micro_batches)
    counts = torch.tensor([float(local[t]) for t in names], dtype=torch.float64, device=run.engine.device)
    torch.distributed.all_reduce(counts)
    in_step = {t: int(c) for t, c in zip(names, counts.tolist()) if t in dict(groups)}
    return loss_scales(run.cfg.loss.task_weighting, in_step, run.world, gradient_accumulation_steps(run.cfg),
                       step_task_weights(run))


def train_loop(run: Run) -> None:
    cfg = run.cfg
    writer = None
    if run.is_writer:
        from mtl_scale.telemetry import MetricsWriter
        writer = MetricsWriter(cfg.output_dir, cfg.max_steps, initial_step=run.step)
    activate = activator(run)
    run.micro_batches_seen = run.micro_batches_seen or {t: 0 for t in run.tasks}
    run.examples_seen = run.examples_seen or {t: 0 for t in run.tasks}
    run.engine.train()
    try:
        while run.step < cfg.max_steps:
            t0 = time.perf_counter()
            groups, stats = train_step(run, run.step, activate)
            metrics = reduce_stats(run, stats)
            if cfg.loss.task_weighting == "dwa":
                metrics.update({f"loss_weight/{t}": w for t, w in step_task_weights(run).items()})
            # DeepSpeed skips the update on every rank when the all-reduced gradient norm is not finite
            skipped = not run.engine.was_step_applied()
            run.consecutive_skips = run.consecutive_skips + 1 if skipped else 0
            metrics.update(step_skipped=int(skipped), skipped_steps=run.engine.skipped_steps)
            if run.consecutive_skips >= cfg.max_consecutive_skips:
                raise TrainingAborted(
                    f"step {run.step + 1}: the loss or gradient was not finite on some rank for "
                    f"{run.consecutive_skips} steps in a row (max_consecutive_skips={cfg.max_consecutive_skips}); "
                    "nothing was updated in them. Lower lr, check the data of the tasks in these steps, or use "
                    "fp32/bf16 instead of fp16")
            if stats.surgery is not None:
                metrics.update(surgery_metrics(stats.surgery, list(run.tasks)))
            step_time = time.perf_counter() - t0
            run.step += 1
            metrics.update(lr=run.engine.get_lr()[0], step_time_s=step_time,
                           tokens_per_s=metrics["tokens"] / step_time)
            for task, micro_batches in groups:
                metrics[f"micro_batches/{task}"] = len(micro_batches)
                run.micro_batches_seen[task] += len(micro_batches)
            total = sum(run.micro_batches_seen.values())
            for task, n in run.micro_batches_seen.items():
                run.examples_seen[task] += int(metrics.pop(f"examples/{task}"))
                metrics[f"samples/{task}"] = run.examples_seen[task]  # counted: grouped/packed vary per micro-batch
                metrics[f"mix/{task}"] = n / total  # the realised sampling mix so far
                metrics[f"draws/{task}"] = n  # cumulative micro-batches of the task: its effective draws
                metrics[f"sampling_prob/{task}"] = run.sampler.probs[task]  # the target this step was drawn from
            if run.step == cfg.max_steps:
                # Saved before the final evaluation: an eval that dies (out of memory, say) keeps the run.
                save_adapters(run)
            if (cfg.eval.every_steps and run.step % cfg.eval.every_steps == 0) or run.step == cfg.max_steps:
                metrics.update(evaluate_during_training(run.model, run.tokenizer, run.tasks, cfg.eval,
                                                        activate, run.rank, run.world))
                run.engine.train()
            if run.balancer is not None:
                update_balancer(run, metrics)
            run.history.append({"step": run.step, **metrics})
            if writer:
                if run.step % cfg.log_every == 0 or run.step == cfg.max_steps or any(k.startswith("eval/") for k in metrics):
                    writer.log(run.step, metrics)
                writer.advance()
            preempt = _any_rank(run, run.stop_requested)
            if preempt or (cfg.checkpoint.every_steps and run.step % cfg.checkpoint.every_steps == 0
                           and run.step < cfg.max_steps):
                checkpoint.save_run(run)
            if preempt:
                run.preempted = True
                log.warning("SIGTERM: checkpoint written at step %d; exiting (resume=auto continues)", run.step)
                break
    finally:
        if writer:
            writer.close()


def update_balancer(run: Run, metrics: dict[str, float]) -> None:
    """Feed the controller this step's per-task train losses and, after an evaluation, the held-out ones;
    both are all-reduced, so every rank computes the same probabilities. They drive the next step's draws."""
    run.balancer.observe_step({t: metrics[f"loss/{t}"] for t in run.tasks if f"loss/{t}" in metrics})
    held_out = {t: metrics[f"eval/loss/{t}"] for t in run.tasks if f"eval/loss/{t}" in metrics}
    if run.balancer.update(run.step, held_out or None):
        run.sampler.probs = dict(run.balancer.probs)


def _any_rank(run: Run, flag: bool) -> bool:
    """True on every rank if ``flag`` is set on any (one tiny all-reduce)."""
    t = torch.tensor([float(flag)], device=run.engine.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def save_adapters(run: Run) -> Path:
    """Every adapter to ``<output_dir>/adapters/<name>/`` (PEFT layout), plus the resolved config
    (what launch/evaluate.py and launch/merge.py need). Collective under ZeRO-3 (gathers the adapters)."""
    out = Path(run.cfg.output_dir)
    for name in run.adapter_names:
        adapters.save_adapter(run.model, name, out / "adapters" / name, run.model_path, run.is_writer)
    if run.is_writer:
        checkpoint.write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(run.cfg), sort_keys=False))
    run.adapters_saved_step = run.step
    return out


def write_summary(run: Run) -> None:
    """``<output_dir>/train_summary.json`` (rank 0): steps, final metrics, data sizes."""
    out = Path(run.cfg.output_dir)
    if run.is_writer:
        summary = {
            "steps": run.step, "world_size": run.world, "adapters": run.adapter_names,
            "base_model": base_model_record(run.cfg.model.path, run.model_path),
            "final": run.history[-1] if run.history else {},
            "data": data_summary(run.tasks),
        }
        checkpoint.write_atomic(out / "train_summary.json", json.dumps(summary, indent=2))


def finish(run: Run) -> None:
    """Adapters and config (unless train_loop saved them at this step), summary; then the report (rank 0)."""
    if run.adapters_saved_step != run.step:
        save_adapters(run)
    write_summary(run)
    if run.is_writer:
        from mtl_scale.report import write_report
        log.info("report: %s", write_report(run.cfg.output_dir))


def train(cfg: RunConfig) -> Run:
    run = setup(cfg)  # resolves resume before the heavy set-up: a wrong resume fails fast, on every rank
    if run.resume_from is not None:
        checkpoint.restore_run(run, run.resume_from)
    signal.signal(signal.SIGTERM, lambda *_: setattr(run, "stop_requested", True))
    train_loop(run)
    if not run.preempted:
        finish(run)
    return run
