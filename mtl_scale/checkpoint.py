"""Periodic checkpoints and exact resume.

    <output_dir>/checkpoints/step_00000040/
        engine/                 DeepSpeed's state: LoRA weights, fp32 partitions, Adam moments, LR
                                scheduler (frozen base weights excluded: a few MB, not the model)
        trainer_rank<r>.pt      per rank: step, sampler cursors/epochs, counters, torch RNG
        config.yaml             the run config that wrote it
        COMPLETE                written last, after every rank finished

A checkpoint is written under ``step_N.partial`` and renamed when complete, so a run killed
mid-write leaves a directory that ``resume=auto`` never picks. Task schedules and PCGrad orders are
functions of (seed, step), so restoring the step restores them.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import torch
import yaml

from mtl_scale.config import RunConfig, to_dict
from mtl_scale.errors import UserError
from mtl_scale.model import base_model_record

log = logging.getLogger(__name__)

# Keys that may differ between the run that wrote a checkpoint and the one resuming from it.
RESUMABLE_CHANGES = ("max_steps", "output_dir", "resume", "checkpoint", "eval", "log_every", "dist_timeout_s",
                     "max_consecutive_skips")  # README "Production" lists these


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``step_N.partial`` never counts, marker or not)."""
    done = [p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / "COMPLETE").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_complete(output_dir: str | Path) -> Path | None:
    done = complete_checkpoints(checkpoint_dir(output_dir))
    return done[-1] if done else None


def save(engine, rank: int, step: int, cfg: RunConfig, rank_state: dict, base: dict | None = None) -> Path:
    """Collective: every rank writes its part, then rank 0 marks the checkpoint complete. ``base``: what the
    run records about its base model (``model.base_model_record``), written as base_model.json."""
    import torch.distributed as dist

    root = checkpoint_dir(cfg.output_dir)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(partial), tag="engine", save_latest=False, exclude_frozen_parameters=True)
    torch.save(rank_state, partial / f"trainer_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (partial / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if base is not None:
            (partial / "base_model.json").write_text(json.dumps(base, indent=2) + "\n")
        (partial / "COMPLETE").write_text(f"step {step}\n")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in complete_checkpoints(root)[:-cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: %s", final)
    dist.barrier()
    return final


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from (``resume``: none | auto | a checkpoint directory), checked
    against this run's config."""
    if cfg.resume == "none":
        return None
    ckpt = latest_complete(cfg.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if ckpt is None:
        return None  # auto with nothing to resume: a fresh start
    if not (ckpt / "COMPLETE").is_file():
        raise UserError(f"resume={cfg.resume}: {ckpt} is not a complete mtl_scale checkpoint (no COMPLETE marker)")
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    now = to_dict(cfg)
    differ = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if differ:
        raise UserError(f"resume: {ckpt} was written by a different config; differing keys: {', '.join(differ)} "
                        f"(only {', '.join(RESUMABLE_CHANGES)} may change on resume)")
    check_same_embedded_base(ckpt, cfg.model.path)
    return ckpt


def check_same_embedded_base(ckpt: Path, model_path: str) -> None:
    """The embedded default is one path (builtin:tiny-llama) for every version of it: a checkpoint trained on
    another version than this checkout's has adapters for other weights, so resuming it is refused."""
    saved_file = ckpt / "base_model.json"
    if not saved_file.is_file():
        return
    saved, now = json.loads(saved_file.read_text()), base_model_record(model_path, "")
    if "sha256" in saved and (saved.get("name"), saved["sha256"]) != (now.get("name"), now.get("sha256")):
        raise UserError(f"resume: {ckpt} was trained on {saved.get('name')} (sha256 {saved['sha256'][:12]}...), "
                        f"but {model_path} is now {now.get('name')} (sha256 {str(now.get('sha256'))[:12]}...); "
                        "resume it with the mtl_scale version that wrote it, or start a fresh run")


def load(engine, rank: int, ckpt: Path) -> dict:
    """Restore the engine (weights, optimizer, scheduler) and return this rank's trainer state.

    Nothing is unpickled with ``weights_only=False``: a checkpoint file that holds anything but tensors,
    plain containers and the DeepSpeed classes in ``deepspeed_safe_globals()`` is refused unrun."""
    ds_loader = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyLoads(ds_loader)  # only for this load: saves stay DeepSpeed's own
    try:
        path, _ = engine.load_checkpoint(str(ckpt), tag="engine", load_module_strict=False)
    finally:
        engine.checkpoint_engine = ds_loader
    if path is None:
        raise UserError(f"resume: DeepSpeed found no engine state in {ckpt / 'engine'}")
    state_file = ckpt / f"trainer_rank{rank}.pt"
    if not state_file.is_file():
        raise UserError(f"resume: {state_file} is missing; was the checkpoint written with another number of ranks?")
    return load_weights_only(state_file)


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed 0.19.8 pickles into a ZeRO checkpoint besides tensors and plain containers (found
    by loading real stage-2 and stage-3 checkpoints, fp32 and bf16, with weights_only=True): the optimizer's
    loss scaler (static; dynamic under fp16), the ZeRO stage enum and, at stage 2, the (numel, start) of each
    parameter's slice. Unpickling rebuilds them from their saved fields or enum value without running
    their code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location=None):
    """``torch.load(weights_only=True)`` allowing ``deepspeed_safe_globals()``; a file holding anything else
    (e.g. a pickled call) is refused with a UserError naming the file and what it holds."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message: "... WeightsUnpickler error: Unsupported global: GLOBAL io.open was not an
            # allowed global by default. Please use ..." -- keep the part that says what was found.
            why = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(e))
            raise UserError(f"resume: refused to load {path}: {why.group(1) if why else e} Resume loads only "
                            "tensors, plain containers and DeepSpeed's few checkpoint classes "
                            "(weights_only=True), because unpickling anything else can run arbitrary code. Was "
                            "the file modified, or written by another DeepSpeed version? Resume from a "
                            "checkpoint you trust.") from None


class WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine that is the engine's own, except that ``load`` unpickles with
    ``weights_only=True`` (DeepSpeed's TorchCheckpointEngine loads with ``weights_only=False``, which runs
    whatever a tampered file pickled)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name and rename it: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def _step_of(line: str) -> float:
    """A metrics line's step; a line cut short by a kill counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return float("inf")


def save_run(run) -> Path:
    """Checkpoint a run (trainer.Run) at its current step: the engine, and per rank the sampler, counters,
    RNG and adaptive controller. Collective."""
    state = {"step": run.step, "sampler": run.sampler.state_dict(), "micro_batches_seen": run.micro_batches_seen,
             "examples_seen": run.examples_seen,
             "consecutive_skips": run.consecutive_skips, "torch_rng": torch.get_rng_state()}
    if run.balancer is not None:  # probabilities, loss EMAs, the rule's weights and history
        state["balancer"] = run.balancer.state_dict()
    if torch.cuda.is_available():  # dropout on GPU draws from the CUDA generator
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return save(run.engine, run.rank, run.step, run.cfg, state, base_model_record(run.cfg.model.path, run.model_path))


def restore_run(run, ckpt: Path) -> None:
    """Put a run (trainer.Run) back at the state ``save_run`` wrote; metrics a killed run logged after it
    are dropped from metrics.jsonl."""
    state = load(run.engine, run.rank, ckpt)
    run.step = state["step"]
    run.sampler.load_state_dict(state["sampler"])
    run.micro_batches_seen = state["micro_batches_seen"]
    run.examples_seen = state.get("examples_seen") or {  # checkpoints before 0.6.1: padded counts
        t: n * run.cfg.micro_batch_size * run.world for t, n in state["micro_batches_seen"].items()}
    run.consecutive_skips = state["consecutive_skips"]
    if run.balancer is not None:
        run.balancer.load_state_dict(state["balancer"])
        run.sampler.probs = dict(run.balancer.probs)
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
            write_atomic(path, "".join(line + "\n" for line in kept))
    log.info("resumed from %s at step %d", ckpt, run.step)
