"""Read a DeepSpeed JSON config and fill its ``"auto"`` values from the run config.

The batch geometry is owned by the run config (the engine's step schedule depends on it), so a
number in the JSON that disagrees with it is an error rather than silently winning.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

from mtl_scale.config import RunConfig
from mtl_scale.errors import UserError

PACKAGE = Path(__file__).resolve().parent  # ships ds_configs/ (the checkout's ds_configs is a link to it)


def resolve_path(path: str) -> Path:
    """``path`` as given, else relative to the package (the shipped ``ds_configs/zero3.json``...), so the
    default config works from any directory and from an installed wheel."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    return PACKAGE / p if (PACKAGE / p).is_file() else p


def gradient_accumulation_steps(cfg: RunConfig) -> int:
    return cfg.sampling.tasks_per_step * cfg.sampling.micro_batches_per_task


def persistence_threshold(hidden_size: int, lora_sizes: Sequence[int] = (), frozen_sizes: Sequence[int] = ()) -> int:
    """The "auto" ``stage3_param_persistence_threshold``, in elements.

    Hugging Face's rule of thumb, 10 x hidden, keeps the small parameters (norms, biases) whole on every
    rank. mtl_scale raises it to the largest LoRA matrix (``lora_sizes``) that is smaller than every
    frozen weight matrix (``frozen_sizes``), so the LoRA matrices are whole on every rank too and the base
    stays partitioned. A whole parameter is not gathered and released around each use, which is
    DeepSpeed bookkeeping per tensor: for K task adapters that would be K times hard sharing's. The
    cost is memory (every adapter whole on every GPU: 0.6% of Llama-3-8B's layer weights per r=16 adapter
    on all projections) and, after each optimizer step, one all-gather of the updated LoRA matrices
    (``zero3_adapters.keep_persistent_gathered``).
    """
    smallest_frozen = min(frozen_sizes, default=float("inf"))
    return max([10 * hidden_size, *(n for n in lora_sizes if n < smallest_frozen)])


def build_ds_config(cfg: RunConfig, world_size: int, hidden_size: int, lora_sizes: Sequence[int] = (),
                    frozen_sizes: Sequence[int] = ()) -> dict:
    """The DeepSpeed dict for ``deepspeed.initialize``. ``lora_sizes`` / ``frozen_sizes`` (elements of
    every LoRA matrix / every frozen weight matrix) decide the "auto" persistence threshold
    (:func:`persistence_threshold`); without them it is 10 x hidden."""
    path = resolve_path(cfg.deepspeed_config)
    if not path.is_file():
        raise UserError(f"deepspeed_config={cfg.deepspeed_config!r}: file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    ds = copy.deepcopy(raw)
    gas = gradient_accumulation_steps(cfg)
    fills = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.micro_batch_size * gas * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16.enabled": cfg.model.dtype == "bf16",
        "fp16.enabled": cfg.model.dtype == "fp16",
        "optimizer.params.lr": cfg.lr,
        "optimizer.params.weight_decay": cfg.weight_decay,
        # The Hugging Face integration's rules of thumb, by hidden size (the persistence threshold raised
        # to keep LoRA matrices whole).
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": persistence_threshold(hidden_size, lora_sizes,
                                                                                      frozen_sizes),
    }
    owned = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    for key, value in fills.items():
        node, leaf = _parent(ds, key)
        if node is None or leaf not in node:
            if key in owned:
                ds[key] = value
            continue
        if node[leaf] == "auto":
            node[leaf] = value
        elif key in owned and node[leaf] != value:
            raise UserError(f"{path}: {key}={node[leaf]} disagrees with the run config ({value}); set it to "
                            "\"auto\" — micro_batch_size and sampling.* decide the batch geometry")
    leftover = _autos(ds)
    if leftover:
        raise UserError(f"{path}: no value known for \"auto\" at {', '.join(leftover)}; "
                        f"autos that mtl_scale fills: {', '.join(fills)}")
    if "optimizer" in ds:
        # Torch and DeepSpeed optimizers other than DeepSpeed's own Adam variants need this under ZeRO.
        ds.setdefault("zero_allow_untested_optimizer", True)
    # DeepSpeed's throughput timer synchronizes the device at every micro-batch's forward and at every
    # engine.step() unless told otherwise (timers.throughput.synchronized: "at the expense of performance"),
    # so the host can never queue a micro-batch's kernels ahead of the GPU. It feeds only the samples/s line
    # that steps_per_print logs; mtl_scale times steps itself. Off, unless the config says otherwise.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    _check_offload(ds, cfg, path)
    return ds


def _check_offload(ds: dict, cfg: RunConfig, path: Path) -> None:
    """Optimizer offload with per-task adapters is exact only where engine.copy_offloaded_grads makes the host
    gradients complete: ZeRO-3 offloading to CPU (checked against the single-process reference). ZeRO-1/2's
    offload copies, like ZeRO-3's, only the gradients reduced in a step's last micro-batch, and measured on
    2 ranks its soft adapters drift from the reference; NVMe offload is untested."""
    device = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if device in ("none", None) or cfg.sharing == "hard":
        return
    if zero_stage(ds) != 3:
        raise UserError(f"{path}: offload_optimizer with sharing={cfg.sharing} needs ZeRO stage 3 (this file has "
                        f"stage {zero_stage(ds)}): at stages 1-2 DeepSpeed would step adapters absent from a step's "
                        "last micro-batch with stale gradients. Use ds_configs/zero3.json with offload_optimizer, "
                        "sharing=hard, or no offload")
    if device != "cpu":
        raise UserError(f"{path}: offload_optimizer.device={device!r} with sharing={cfg.sharing} is not supported "
                        "(only \"cpu\" is checked exact for per-task adapters); use \"cpu\" or sharing=hard")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _parent(d: dict, dotted: str):
    *path, leaf = dotted.split(".")
    for part in path:
        d = d.get(part)
        if not isinstance(d, dict):
            return None, leaf
    return d, leaf


def _autos(d, prefix="") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _autos(v, f"{prefix}{k}.")
        elif v == "auto":
            out.append(prefix + k)
    return out
