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
from datetime import timedelta
from pathlib import Path

import torch
import yaml

from mtl_scale import adapters, batching, checkpoint, kernels, shared_fs, stage_choice, zero3_adapters
from mtl_scale.config import RunConfig, to_dict
from mtl_scale.data.formatting import completion_tokens
from mtl_scale.data.prepare import TaskData, data_summary, prepare_tasks
from mtl_scale.ds_config import build_ds_config, gradient_accumulation_steps, zero_stage
from mtl_scale.engine import Coupling, StepStats, Surgery, optimizer_step
from mtl_scale.evaluate import evaluate_during_training
from mtl_scale.loss_weighting import loss_scales
from mtl_scale.model import load_model, load_tokenizer, resolve_model_path
from mtl_scale.process_group import free_port
from mtl_scale.errors import TrainingAborted, UserError
from mtl_scale.sampling import TaskSampler
from mtl_scale.surgery import cosine_matrix

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
    resume_from: Path | None = None
    """The checkpoint every rank agreed to resume from (``resume``), restored by ``train``."""
    step: int = 0
    history: list[dict] = field(default_factory=list)
    micro_batches_seen: dict[str, int] = field(default_factory=dict)
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


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Join the process group the launcher set up (or make a one-rank group for ``python train.py``)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun, one task per GPU
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ["SLURM_LOCALID"],
                          LOCAL_WORLD_SIZE=os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError("under srun, export MASTER_ADDR (the first node's hostname) and MASTER_PORT; "
                            "see launch/slurm_srun.sbatch")
    if "RANK" not in os.environ:  # started without a launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    on_gpu = get_accelerator().device_name() == "cuda"
    if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine share its cores; oversubscription makes every rank slower.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    if on_gpu:
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


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


def setup(cfg: RunConfig) -> Run:
    import deepspeed
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    # Everything that can fail on bad input happens before the process group exists.
    try:  # this rank's view only: a wrong resume is raised below, on every rank together
        local_resume = checkpoint.resolve_resume(cfg)
    except UserError as e:
        local_resume = e
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    tasks = prepare_tasks(cfg, tokenizer)
    hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    hidden = getattr(hf_config, "hidden_size", 1024)
    if cfg.model.liger_kernels:  # patches the architecture's classes: before the model is built
        kernels.apply_liger(hf_config.model_type, torch.cuda.is_available())

    rank, world = init_distributed(cfg.dist_timeout_s)
    # Before the heavy set-up and before anything is written or resumed: node-local output_dirs, or
    # ranks that found different checkpoints, would otherwise diverge and hang until dist_timeout_s.
    shared_fs.check_output_dir(cfg.output_dir, rank, world)
    resume_from = shared_fs.agree_on_resume(cfg.resume, local_resume, rank, world)
    if cfg.deepspeed_config == stage_choice.AUTO:
        cfg = _choose_stage(cfg, model_path, rank, world)
    ds_config = build_ds_config(cfg, world, hidden)
    # Alive before from_pretrained: transformers then builds the model inside zero.Init, partitioned.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    model = load_model(cfg.model, model_path)
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
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    if zero_stage(ds_config) == 3:
        zero3_adapters.skip_inactive_reductions(engine.optimizer, model)
        zero3_adapters.cache_parameter_lists(model)
        zero3_adapters.keep_persistent_gathered(engine.optimizer)
    sampler = TaskSampler({t: len(d.train) for t, d in tasks.items()}, cfg.sampling, cfg.seed, rank, world)
    surgery, coupling = _surgery_and_coupling(cfg, model, names, zero_stage(ds_config))
    if rank == 0:
        log.info("world %d, ZeRO stage %d, sharing=%s, adapters %s, trainable parameters %d, batching %s",
                 world, zero_stage(ds_config), cfg.sharing, adapters.adapter_names(cfg.sharing, list(tasks)),
                 sum(getattr(p, "ds_numel", p.numel()) for p in trainable), _batching_text(cfg))
    return Run(cfg, rank, world, model_path, tokenizer, tasks, model, engine, sampler, ds_config, hf_ds_config,
               surgery=surgery, coupling=coupling, resume_from=resume_from)


def _choose_stage(cfg: RunConfig, model_path: str, rank: int, world: int) -> RunConfig:
    """deepspeed_config: auto (mtl_scale/stage_choice.py), the same choice on every rank: it is made for the
    smallest device memory of any rank."""
    from mtl_scale.model_shape import load_model_config, model_shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = torch.tensor([stage_choice.local_memory_gib(device)], dtype=torch.float64,
                          device="cuda" if device == "cuda" else "cpu")
    torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MIN)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    shape = model_shape(*load_model_config(model_path, cfg.model.trust_remote_code))
    choice = stage_choice.choose_stage(cfg, shape, max(1, world // local), min(local, world), float(memory), device)
    if rank == 0:
        log.info("deepspeed_config auto: %s (%s)", choice.deepspeed_config, choice.reason)
    return choice.apply(cfg)


def _batching_text(cfg: RunConfig) -> str:
    b = cfg.batching
    if b.mode == "padded":
        return f"padded ({cfg.micro_batch_size} examples per micro-batch)"
    if b.mode == "grouped":
        return f"grouped by length ({f'<= {b.max_tokens} padded tokens' if b.max_tokens else cfg.micro_batch_size} " \
               "per micro-batch)"
    return (f"packed (<= {b.max_tokens} tokens per micro-batch, rows of ~{batching.row_tokens(cfg)}, "
            f"{cfg.model.attn_implementation} attention with position ids restarting per example)")


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
        per_adapter = [adapters.lora_parameters(model, name) for name in names]
        groups = [[per_adapter[i][adapters.rename_adapter_key(key, names[0], name)] for i, name in enumerate(names)]
                  for key in per_adapter[0]]
        coupling = Coupling(cfg.soft.coupling, groups)
    return surgery, coupling


def _activator(run: Run):
    """Task -> make the LoRA layers apply its adapters. Hard sharing: always the same, nothing to do."""
    if run.cfg.sharing == "hard":
        return lambda task: None
    layers = adapters.tuner_layers(run.model)
    return lambda task: adapters.activate(run.model, adapters.adapters_for_task(run.cfg.sharing, task), layers)


def next_step_groups(run: Run, step: int):
    """The step's (task, [micro-batch, ...]) groups: rank-identical tasks, this rank's examples.
    ``batching.mode`` decides which examples share a micro-batch and their layout, never how many
    micro-batches the step has."""
    groups = []
    for task, n_micro in run.sampler.plan(step):
        data = run.tasks[task].train
        micro_batches = []
        for _ in range(n_micro):
            if run.cfg.batching.mode == "padded":
                idx = run.sampler.take(task, run.cfg.micro_batch_size)
            else:
                if task not in run.batchers:
                    run.batchers[task] = batching.batcher(run.cfg, [len(ids) for ids in data.input_ids])
                idx = run.sampler.take_batch(task, run.batchers[task])
            micro_batches.append(batching.collate(run.cfg, [(data.input_ids[i], data.labels[i]) for i in idx],
                                                  run.tokenizer.pad_token_id))
        groups.append((task, micro_batches))
    return groups


def absent_parameters(run: Run, groups) -> list[torch.nn.Parameter]:
    """The trainable parameters of adapters no task of this step uses; the step leaves them untouched.

    Soft coupling is the exception: its regulariser pulls every adapter toward the mean each step,
    so with coupling every adapter takes part in every step.
    """
    if run.cfg.sharing == "hard" or run.coupling is not None:
        return []
    if not run.adapter_params:  # named_parameters() walks the whole model: once per run, not per step
        run.adapter_params = {n: list(adapters.lora_parameters(run.model, n).values()) for n in run.adapter_names}
    used = {name for task, _ in groups for name in adapters.adapters_for_task(run.cfg.sharing, task)}
    return [p for name, params in run.adapter_params.items() if name not in used for p in params]


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
                       run.cfg.loss.weights)


def reduce_stats(run: Run, stats: StepStats) -> dict[str, float]:
    """Sum per-task loss and token counts over ranks (one small all-reduce) into step metrics."""
    names = list(run.tasks)
    vec = torch.tensor([stats.loss_sum.get(t, 0.0) for t in names] +
                       [float(stats.loss_tokens.get(t, 0)) for t in names] + [float(stats.tokens)],
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


def train_loop(run: Run) -> None:
    cfg = run.cfg
    writer = None
    if run.is_writer:
        from mtl_scale.telemetry import MetricsWriter
        writer = MetricsWriter(cfg.output_dir, cfg.max_steps, initial_step=run.step)
    activate = _activator(run)
    run.micro_batches_seen = run.micro_batches_seen or {t: 0 for t in run.tasks}
    run.engine.train()
    try:
        while run.step < cfg.max_steps:
            t0 = time.perf_counter()
            groups = next_step_groups(run, run.step)
            stats = optimizer_step(run.engine, groups, activate, step_loss_scales(run, groups),
                                   run.surgery, run.coupling, step=run.step, absent=absent_parameters(run, groups))
            metrics = reduce_stats(run, stats)
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
                metrics[f"samples/{task}"] = n * cfg.micro_batch_size * run.world
                metrics[f"mix/{task}"] = n / total  # the realised sampling mix so far
                metrics[f"sampling_prob/{task}"] = run.sampler.probs[task]
            if run.step == cfg.max_steps:
                # Saved before the final evaluation: an eval that dies (out of memory, say) keeps the run.
                save_adapters(run)
            if (cfg.eval.every_steps and run.step % cfg.eval.every_steps == 0) or run.step == cfg.max_steps:
                metrics.update(evaluate_during_training(run.model, run.tokenizer, run.tasks, cfg.eval,
                                                        activate, run.rank, run.world))
                run.engine.train()
            run.history.append({"step": run.step, **metrics})
            if writer:
                if run.step % cfg.log_every == 0 or run.step == cfg.max_steps or any(k.startswith("eval/") for k in metrics):
                    writer.log(run.step, metrics)
                writer.advance()
            preempt = _any_rank(run, run.stop_requested)
            if preempt or (cfg.checkpoint.every_steps and run.step % cfg.checkpoint.every_steps == 0
                           and run.step < cfg.max_steps):
                save_checkpoint(run)
            if preempt:
                run.preempted = True
                log.warning("SIGTERM: checkpoint written at step %d; exiting (resume=auto continues)", run.step)
                break
    finally:
        if writer:
            writer.close()


def _any_rank(run: Run, flag: bool) -> bool:
    """True on every rank if ``flag`` is set on any (one tiny all-reduce)."""
    t = torch.tensor([float(flag)], device=run.engine.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _step_of(line: str) -> float:
    """A metrics line's step; a line cut short by a kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return float("inf")


def save_checkpoint(run: Run) -> Path:
    state = {"step": run.step, "sampler": run.sampler.state_dict(), "micro_batches_seen": run.micro_batches_seen,
             "consecutive_skips": run.consecutive_skips, "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on GPU draws from the CUDA generator
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return checkpoint.save(run.engine, run.rank, run.step, run.cfg, state)


def restore(run: Run, ckpt: Path) -> None:
    state = checkpoint.load(run.engine, run.rank, ckpt)
    run.step = state["step"]
    run.sampler.load_state_dict(state["sampler"])
    run.micro_batches_seen = state["micro_batches_seen"]
    run.consecutive_skips = state["consecutive_skips"]
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    schedule = run.engine.lr_scheduler.lr_lambdas[0]  # its horizon came back with the scheduler's state
    if run.is_writer and schedule.schedule != "constant" and schedule.horizon != run.cfg.max_steps:
        log.warning("resume: max_steps is now %d, but the %s LR schedule keeps the horizon it started with "
                    "(max_steps=%d): %s", run.cfg.max_steps, schedule.schedule, schedule.horizon,
                    f"the LR stays at its 10% floor after step {schedule.horizon}"
                    if run.cfg.max_steps > schedule.horizon else "the run stops before the LR has decayed")
    if run.is_writer:  # drop metrics a killed run wrote after this checkpoint
        path = Path(run.cfg.output_dir) / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= run.step]
            _write_atomic(path, "".join(line + "\n" for line in kept))
    log.info("resumed from %s at step %d", ckpt, run.step)


def save_adapters(run: Run) -> Path:
    """Every adapter to ``<output_dir>/adapters/<name>/`` (PEFT layout), plus the resolved config
    (what launch/evaluate.py and launch/merge.py need). Collective under ZeRO-3 (gathers the adapters)."""
    out = Path(run.cfg.output_dir)
    for name in run.adapter_names:
        adapters.save_adapter(run.model, name, out / "adapters" / name, run.model_path, run.is_writer)
    if run.is_writer:
        _write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(run.cfg), sort_keys=False))
    run.adapters_saved_step = run.step
    return out


def write_summary(run: Run) -> None:
    """``<output_dir>/train_summary.json`` (rank 0): steps, final metrics, data sizes."""
    out = Path(run.cfg.output_dir)
    if run.is_writer:
        summary = {
            "steps": run.step, "world_size": run.world, "adapters": run.adapter_names,
            "final": run.history[-1] if run.history else {},
            "data": data_summary(run.tasks),
        }
        _write_atomic(out / "train_summary.json", json.dumps(summary, indent=2))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


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
        restore(run, run.resume_from)
    signal.signal(signal.SIGTERM, lambda *_: setattr(run, "stop_requested", True))
    train_loop(run)
    if not run.preempted:
        finish(run)
    return run
