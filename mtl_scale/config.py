"""The run configuration: one typed schema, loaded from YAML, overridable with dotted ``key=value``.

    cfg = load_config("configs/demo.yaml", ["sharing=soft", "lora.r=16"])

Every key a user can write is a dataclass field below, with its meaning in the docstring under it.
Unknown keys are rejected with the list of valid ones; bad values name the key and what is allowed.
This module imports nothing of mtl_scale but its error type.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtl_scale.errors import UserError


class ConfigError(UserError):
    """A user-facing configuration error (printed without a traceback by the launchers)."""


# The embedded default model: a committed byte-level tiny Llama (mtl_scale/assets, built by mtl_scale.base_model).
TINY_MODEL = "builtin:tiny-llama"

SHARING_MODES = ("hard", "soft", "hybrid")
SURGERY_METHODS = ("sum", "mean", "pcgrad", "mgda")
DTYPES = ("fp32", "bf16", "fp16")
QUANTIZATION = ("none", "nf4", "fp4")
TASK_FORMATS = ("prompt_completion", "alpaca", "chat")
SAMPLING_STRATEGIES = ("proportional", "temperature", "uniform", "manual", "adaptive")
ADAPTIVE_RULES = ("progress", "gap")  # mtl_scale.balancing.RULES
LR_SCHEDULES = ("constant", "cosine", "linear")
TRUNCATION = ("truncate", "drop")
LOSS_WEIGHTING = ("token", "task", "manual", "dwa")
BATCHING_MODES = ("padded", "grouped", "packed")


@dataclass
class ModelConfig:
    path: str = TINY_MODEL
    """A local directory or hub id loadable by ``AutoModelForCausalLM.from_pretrained``, or
    ``builtin:tiny-llama`` for the embedded default (committed weights, see mtl_scale/base_model.py)."""
    dtype: str = "fp32"
    """Training dtype of the base weights: fp32 | bf16 | fp16. Use bf16 on GPUs; CPU runs need fp32."""
    attn_implementation: str = "sdpa"
    """Passed to ``from_pretrained``: sdpa | eager | flash_attention_2 (GPU, needs flash-attn) | sdpa_varlen
    (mtl_scale/attention.py: sdpa, but packed rows cost attention per example, as flash-attn varlen does,
    on any device)."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint. Off unless you trust the checkpoint's source."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute. Use it for 7B+ models."""
    quantization: str = "none"
    """QLoRA: none | nf4 | fp4 — load the frozen base in 4 bits with bitsandbytes (the packed weights
    are stored in ``dtype`` so that ZeRO-3 can shard them with everything else)."""
    liger_kernels: bool = False
    """GPU only: Liger's Triton kernels for RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy
    (pip install liger-kernel; mtl_scale/kernels.py); a CPU run with it on stops with an error."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank: higher adapts more and costs more memory."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names (suffixes) that get a LoRA adapter, or ["all-linear"]."""
    shared_a: bool = False
    """Every per-task adapter (soft, and hybrid's task adapters) uses one frozen random A per module, the
    same in all of them; only B trains. Their updates B_t·A then add without cross terms, so factor-wise
    merges (linear, ties, dare) of B are exact task arithmetic (LoRA-FA / FFA-LoRA)."""


@dataclass
class TaskConfig:
    name: str = ""
    """Unique task name; also the adapter name under soft sharing."""
    source: str = ""
    """A local .jsonl/.json/.parquet/.csv file, a hub dataset id, or ``builtin:<generator>``
    (copy, reverse, sort, add)."""
    format: str = "prompt_completion"
    """prompt_completion | alpaca (instruction/input/output) | chat (a ``messages`` list)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Maps this format's field names to the dataset's column names, e.g. {prompt: question}."""
    split: str = "train"
    """Split to read from a hub dataset (a local file is read whole)."""
    subset: str | None = None
    """Hub dataset configuration name, if it has several."""
    num_examples: int | None = None
    """Use at most this many examples (None: all). For builtin generators: how many to generate."""
    eval_size: int = 100
    """Examples held out for evaluation (taken before training examples, deterministic by seed)."""
    metric: str = "exact_match"
    """How a held-out example is scored (mtl_scale/metrics.py): exact_match (the whole greedy answer) |
    extract (answer_pattern pulls the answer out of generation and reference; numbers compared as numbers) |
    contains (the reference appears in the generation) | choice (the option in ``choices`` with the highest
    log-likelihood, no generation) | rouge_l (ROUGE-L F1, needs rouge-score) | a dotted path to a function
    (prediction, reference) -> float, e.g. mypkg.metrics.f1."""
    answer_pattern: str | None = None
    """metric=extract: a regex whose group 1 is the answer; default GSM8K's final answer, ``####\\s*(-?[0-9.,]+)``."""
    choices: list[str] = field(default_factory=list)
    """metric=choice: the options (e.g. the class labels); each held-out reference should be one of them."""
    max_new_tokens: int | None = None
    """Generated tokens per held-out example for this task (None: eval.max_new_tokens)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends at the first one, which is not part of the scored answer."""


@dataclass
class AdaptiveConfig:
    rule: str = "progress"
    """How sampling.strategy=adaptive moves the distribution (mtl_scale/balancing.py): progress (tasks whose
    loss still falls gain draws, flat or rising ones lose them) | gap (tasks further above their
    sampling.reference loss gain draws)."""
    every_steps: int = 10
    """Update the distribution every N optimizer steps (and at every evaluation, from held-out losses)."""
    eta: float | None = None
    """Step size of w <- w * exp(eta * delta); None: the rule's default (progress 5.0, gap 1.0)."""
    floor: float = 0.2
    """Share of the draws spread uniformly over all tasks, so no task drops below floor / K."""
    ema_decay: float = 0.9
    """Decay of the per-task train-loss moving average the rules read between evaluations."""


@dataclass
class SamplingConfig:
    strategy: str = "proportional"
    """Which task each micro-batch group comes from: proportional (p ∝ n) | temperature
    (p ∝ n^(1/T)) | uniform | manual (``weights``) | adaptive (starts at the temperature distribution
    and follows per-task losses during training, see ``adaptive``)."""
    temperature: float = 1.0
    """T for strategy=temperature, and of the prior strategy=adaptive starts from: 1 is proportional,
    large T approaches uniform."""
    weights: dict[str, float] = field(default_factory=dict)
    """Per-task weights for strategy=manual (normalised to sum 1)."""
    tasks_per_step: int = 4
    """Task draws per optimizer step (with replacement; repeated draws of a task are grouped)."""
    micro_batches_per_task: int = 1
    """Micro-batches per task draw. Gradient accumulation = tasks_per_step * micro_batches_per_task."""
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    """The controller of strategy=adaptive."""
    reference: list[str] = field(default_factory=list)
    """Per-task reference losses for adaptive.rule=gap: eval.json files written by launch/evaluate.py, run
    directories (their metrics.jsonl's last eval/loss/<task>), e.g. the single-task runs, or ``task=loss``
    items (numbers measured once, e.g. ``add=0.52``); the first item that has a task gives its reference."""


@dataclass
class SurgeryConfig:
    method: str = "sum"
    """Gradient surgery on the shared adapter (hard, hybrid) before each optimizer step: sum (plain
    training) | mean (1/K) | pcgrad (project conflicting task gradients, Yu et al. 2020) | mgda
    (min-norm combination, Sener & Koltun 2018). Needs ZeRO-3."""
    telemetry: bool = False
    """With method=sum: still measure the task-gradient Gram matrix and log cosines (K gradient-shard
    copies and one K×K all-reduce per step); other methods always log it."""


@dataclass
class HybridConfig:
    task_r: int = 4
    """LoRA rank of each task's own adapter under sharing=hybrid (the shared one uses lora.r)."""


@dataclass
class SoftConfig:
    coupling: float = 0.0
    """λ of the regulariser λ·Σ_t ||θ_t − mean(θ)||² pulling task adapters together (sharing=soft), on the
    trainable factors: with lora.shared_a that is B alone, so the pull is on B_t·A up to A's conditioning;
    without it, on A and B separately."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Write a checkpoint (adapters, optimizer, scheduler, sampler, RNG) every N steps (0: never).
    SIGTERM (cluster pre-emption) always writes one and exits 0."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted."""


@dataclass
class DwaConfig:
    temperature: float = 2.0
    """T of w_k = K * softmax(r_k / T), r_k the ratio of task k's last two train-loss averages: larger T
    keeps the weights nearer 1."""
    ema_decay: float = 0.9
    """Decay of the per-task train-loss moving average whose successive values give r_k."""


@dataclass
class BatchingConfig:
    mode: str = "padded"
    """How a task's examples fill a micro-batch (docs/TRAINING.md, Batching): padded (micro_batch_size
    examples in shard order, right-padded to the longest) | grouped (examples of similar length together,
    order still random) | packed (whole examples share rows up to max_tokens, no padding between them;
    attention never crosses examples). Micro-batches per step are the same in every mode."""
    max_tokens: int = 0
    """Token budget of one micro-batch. packed: needed, at least max_seq_len (every example must fit);
    grouped: 0 keeps micro_batch_size examples, > 0 takes as many as fit when padded (count x longest);
    padded: must stay 0."""
    row_tokens: int = 0
    """packed: most tokens in one row; a micro-batch holds max_tokens // row_tokens rows, packed best-fit-
    decreasing. 0: max_tokens (one row) under model.attn_implementation=flash_attention_2 or sdpa_varlen,
    whose attention costs per example; else max_seq_len, because sdpa and eager apply the block-diagonal
    mask densely (quadratic in the row). Larger rows pack tighter. Between max_seq_len and max_tokens.
    Rows hold equal tokens, or under attention per example equal compute (batching.balanced_bins)."""


@dataclass
class LossConfig:
    task_weighting: str = "token"
    """How a step's losses combine (see mtl_scale/loss_weighting.py): token (every completion token of
    the step weighs the same) | task (each task's token-mean loss, tasks weighted equally) |
    manual (``weights`` times each task's token-mean loss) | dwa (as manual, with weights from Dynamic
    Weight Average: tasks whose loss falls slower weigh more)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Per-task loss weights for task_weighting=manual."""
    dwa: DwaConfig = field(default_factory=DwaConfig)
    """Dynamic Weight Average for task_weighting=dwa."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate held-out loss and exact match during training every N steps (0: only at the end)."""
    max_examples: int = 50
    """Held-out examples per task for evaluation during training (launch/evaluate.py uses all)."""
    max_new_tokens: int = 64
    """Upper bound on generated tokens for exact match (the reference length + 2 if shorter)."""
    batch_size: int = 32
    """Examples per generation batch."""
    loss_chunk_tokens: int = 1024
    """Held-out loss: completion positions per output-head chunk, whose fp32 logits (4 B x vocab each,
    0.5 GB at a 128k vocab) are the eval's largest tensor; 0 takes the full logits of each batch."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sharing: str = "soft"
    """hard: one adapter shared by all tasks | soft: one adapter per task | hybrid: a shared adapter
    plus a small per-task one (hybrid.task_r)."""
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    soft: SoftConfig = field(default_factory=SoftConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    """The tasks to train on, each with a unique name."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    max_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Examples per micro-batch per rank."""
    max_seq_len: int = 512
    """Longest tokenised example (prompt + completion)."""
    truncation: str = "truncate"
    """For examples longer than max_seq_len: truncate (cut the end) | drop. Either way, an example
    whose completion would be cut away completely is dropped; both are counted and logged."""
    lr: float = 2e-4
    """Peak learning rate."""
    lr_schedule: str = "cosine"
    """constant | cosine | linear decay to 10% of lr after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    seed: int = 0
    """Seeds data order, task schedule and adapter initialisation (identical on every rank)."""
    output_dir: str = "runs/demo"
    """Where adapters, metrics.jsonl and TensorBoard events go."""
    deepspeed_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON; its "auto" values are filled from this config. Relative paths resolve
    against the current directory, then the mtl_scale checkout. ``auto``: the memory planner picks
    ds_configs/zero2.json (frozen base replicated) when it fits, else zero3.json, else zero3.json with
    model.quantization=nf4, and the run logs the choice and why (mtl_scale/stage_choice.py)."""
    log_every: int = 1
    """Write metrics every N optimizer steps."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "none"
    """none | auto (the newest complete checkpoint under output_dir, if any) | a checkpoint directory."""
    max_consecutive_skips: int = 10
    """A step whose loss or gradient is non-finite on any rank is skipped on all ranks (DeepSpeed
    checks the all-reduced gradient norm); after this many in a row the run aborts."""
    dist_timeout_s: int = 600
    """Collective timeout: a rank stuck this long (a peer died) aborts instead of hanging."""


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or start from defaults when ``path`` is None), apply ``key=value``
    overrides, build the typed config and validate it."""
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw, where, prefix="")
    validate(cfg, where)
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. lora.r=16)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a mapping")
    # YAML parsing of the value gives ints, floats, bools, lists ("[a, b]") and mappings for free.
    parsed = yaml.safe_load(value) if value.strip() else ""
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key)] = parsed
    else:
        node[parts[-1]] = parsed


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not an index below {len(node)}")
    return int(part)


def _build(cls, raw: Any, where: str, prefix: str):
    """Recursively turn a mapping into dataclass ``cls``, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {prefix}{unknown[0]!s}; valid keys"
                          f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, where, f"{prefix}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _convert(tp, value, where: str, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, key + ".")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        return _convert(tp, value, where, key)
    if origin is list:
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [_convert(args[0], v, where, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def _one_of(where: str, key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(where: str, key: str, value, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{where}: {key} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def validate(cfg: RunConfig, where: str = "<config>") -> None:
    """Checks that need more than one field, or a value from a fixed set."""
    _one_of(where, "sharing", cfg.sharing, SHARING_MODES)
    _one_of(where, "model.dtype", cfg.model.dtype, DTYPES)
    _one_of(where, "model.quantization", cfg.model.quantization, QUANTIZATION)
    _one_of(where, "sampling.strategy", cfg.sampling.strategy, SAMPLING_STRATEGIES)
    _one_of(where, "lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    _one_of(where, "truncation", cfg.truncation, TRUNCATION)
    _one_of(where, "loss.task_weighting", cfg.loss.task_weighting, LOSS_WEIGHTING)
    _one_of(where, "surgery.method", cfg.surgery.method, SURGERY_METHODS)
    _check_batching(where, cfg)
    if cfg.surgery.method != "sum" and cfg.sharing == "soft":
        raise ConfigError(f"{where}: surgery.method={cfg.surgery.method} acts on the adapter the tasks share, and "
                          "sharing=soft has none; use sharing=hard or sharing=hybrid, or surgery.method=sum")
    if cfg.lora.shared_a and cfg.sharing == "hard":
        raise ConfigError(f"{where}: lora.shared_a shares A between per-task adapters, and sharing=hard has one "
                          "adapter; use sharing=soft or sharing=hybrid, or lora.shared_a=false")
    if cfg.soft.coupling and cfg.sharing != "soft":
        raise ConfigError(f"{where}: soft.coupling couples per-task adapters; it needs sharing=soft")
    for key in ("max_steps", "micro_batch_size", "max_seq_len", "lora.r", "sampling.tasks_per_step",
                "sampling.micro_batches_per_task", "log_every", "eval.batch_size", "dist_timeout_s",
                "max_consecutive_skips", "checkpoint.keep_last", "lr", "lora.alpha", "sampling.temperature",
                "hybrid.task_r"):
        _positive(where, key, _get(cfg, key))
    for key in ("warmup_steps", "weight_decay", "max_grad_norm", "eval.max_new_tokens", "eval.every_steps",
                "eval.max_examples", "eval.loss_chunk_tokens", "soft.coupling", "checkpoint.every_steps"):
        _positive(where, key, _get(cfg, key), zero_ok=True)
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"{where}: lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.lora.target_modules:
        raise ConfigError(f"{where}: lora.target_modules is empty; name at least one module, or all-linear")
    if not cfg.tasks:
        raise ConfigError(f"{where}: tasks is empty; give at least one task with name, source and format")
    names = set()
    for i, t in enumerate(cfg.tasks):
        key = f"tasks.{i}"
        if not t.name:
            raise ConfigError(f"{where}: {key}.name is missing; every task needs a unique name")
        if not t.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{where}: {key}.name={t.name!r} may hold only letters, digits, '_' and '-' "
                              "(it names the adapter directory)")
        if t.name == "shared":
            raise ConfigError(f"{where}: {key}.name='shared' is reserved for the shared adapter; rename the task")
        if t.name in names:
            raise ConfigError(f"{where}: duplicate task name {t.name!r} ({key}); task names must be unique")
        names.add(t.name)
        if not t.source:
            raise ConfigError(f"{where}: {key}.source is missing for task {t.name!r}")
        _one_of(where, f"{key}.format (task {t.name!r})", t.format, TASK_FORMATS)
        _positive(where, f"{key}.eval_size", t.eval_size, zero_ok=True)
        if t.num_examples is not None:
            _positive(where, f"{key}.num_examples", t.num_examples)
        _check_metric(t, key, where)
    if cfg.sampling.strategy == "manual":
        _check_weights(where, "sampling.weights", cfg.sampling.weights, names)
    if cfg.loss.task_weighting == "manual":
        _check_weights(where, "loss.weights", cfg.loss.weights, names)
    _check_adaptive(cfg, where)


def _check_adaptive(cfg: RunConfig, where: str) -> None:
    s, a = cfg.sampling, cfg.sampling.adaptive
    _one_of(where, "sampling.adaptive.rule", a.rule, ADAPTIVE_RULES)
    _positive(where, "sampling.adaptive.every_steps", a.every_steps)
    if a.eta is not None:
        _positive(where, "sampling.adaptive.eta", a.eta)
    _positive(where, "loss.dwa.temperature", cfg.loss.dwa.temperature)
    if not 0 <= a.floor <= 1:
        raise ConfigError(f"{where}: sampling.adaptive.floor must be in [0, 1], got {a.floor}")
    for key in ("sampling.adaptive.ema_decay", "loss.dwa.ema_decay"):
        if not 0 <= _get(cfg, key) < 1:
            raise ConfigError(f"{where}: {key} must be in [0, 1), got {_get(cfg, key)}")
    if s.strategy == "adaptive" and a.rule == "gap" and not s.reference:
        raise ConfigError(f"{where}: sampling.adaptive.rule=gap needs sampling.reference: eval.json files "
                          "(launch/evaluate.py), run directories or <task>=<loss> items giving each task's reference loss")


def _check_metric(t: TaskConfig, key: str, where: str) -> None:
    from mtl_scale.metrics import resolve

    try:
        resolve(t.metric, t.answer_pattern, t.name)
    except UserError as e:
        raise ConfigError(f"{where}: {key}.metric: {e}") from None
    if t.metric == "choice" and len(t.choices) < 2:
        raise ConfigError(f"{where}: {key}.choices: metric=choice (task {t.name!r}) needs at least two options, "
                          f"got {t.choices}")
    if t.choices and t.metric != "choice":
        raise ConfigError(f"{where}: {key}.choices is read only by metric=choice (task {t.name!r} has "
                          f"metric={t.metric}); remove it")
    if t.answer_pattern is not None and t.metric != "extract":
        raise ConfigError(f"{where}: {key}.answer_pattern is read only by metric=extract (task {t.name!r} has "
                          f"metric={t.metric}); remove it")
    if t.max_new_tokens is not None:
        _positive(where, f"{key}.max_new_tokens", t.max_new_tokens)


def _check_batching(where: str, cfg: RunConfig) -> None:
    b = cfg.batching
    _one_of(where, "batching.mode", b.mode, BATCHING_MODES)
    _positive(where, "batching.max_tokens", b.max_tokens, zero_ok=True)
    _positive(where, "batching.row_tokens", b.row_tokens, zero_ok=True)
    if b.mode == "packed" and b.max_tokens < cfg.max_seq_len:
        raise ConfigError(f"{where}: batching.mode=packed needs batching.max_tokens >= max_seq_len "
                          f"({cfg.max_seq_len}) so that every example fits a micro-batch; got {b.max_tokens}")
    if b.row_tokens and b.mode == "packed" and not cfg.max_seq_len <= b.row_tokens <= b.max_tokens:
        raise ConfigError(f"{where}: batching.row_tokens={b.row_tokens} must lie between max_seq_len "
                          f"({cfg.max_seq_len}; every example fits a row) and batching.max_tokens ({b.max_tokens})")
    if b.mode == "padded" and b.max_tokens:
        raise ConfigError(f"{where}: batching.max_tokens={b.max_tokens} has no effect with batching.mode=padded "
                          "(micro_batch_size examples, padded); use mode grouped or packed, or max_tokens 0")
    if b.row_tokens and b.mode != "packed":
        raise ConfigError(f"{where}: batching.row_tokens applies to batching.mode=packed only; "
                          f"mode is {b.mode}")


def _check_weights(where: str, key: str, weights: dict[str, float], names: set[str]) -> None:
    missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
    if missing or extra:
        raise ConfigError(f"{where}: {key} must give one weight per task; "
                          f"missing: {missing or 'none'}, unknown: {extra or 'none'}; tasks: {sorted(names)}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ConfigError(f"{where}: {key} must be >= 0 with a positive sum")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def valid_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """All dotted keys of the schema (used by docs and tests)."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys
