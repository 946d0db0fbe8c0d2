"""Adapter topology (which LoRA adapters exist), per-micro-batch activation, and gather-safe export.

- hard sharing: one adapter, ``shared``, trained by every task;
- soft sharing: one adapter per task, named after the task;
- hybrid: ``shared`` plus a small adapter per task; a task's micro-batches use both.

All adapters are trainable from the start and stay so (but for the frozen shared A of
``lora.shared_a``, frozen from the start): DeepSpeed registers its gradient hooks and
optimizer groups once, at ``initialize``. Switching tasks therefore only changes which adapter the
LoRA layers *use* (``_active_adapter``), never ``requires_grad`` (PEFT's ``set_adapter`` would).
An inactive adapter takes no part in the forward pass, so its gradient is exactly zero.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import torch

SHARED = "shared"


def adapter_names(sharing: str, tasks: list[str]) -> list[str]:
    return {"hard": [SHARED], "soft": list(tasks), "hybrid": [SHARED, *tasks]}[sharing]


def adapters_for_task(sharing: str, task: str) -> list[str]:
    """The adapters a task's forward pass applies."""
    return {"hard": [SHARED], "soft": [task], "hybrid": [SHARED, task]}[sharing]


def attach_adapters(model, lora_cfg, names: list[str], seed: int, task_r: int | None = None):
    """Wrap ``model`` in a PeftModel holding one LoRA adapter per name, all trainable.

    Seeded so that every rank initialises identical adapters. With ``task_r``, every adapter but
    ``shared`` gets that rank (hybrid sharing). With ``lora_cfg.shared_a``, every adapter but ``shared``
    gets the first task adapter's (seeded, random) A, frozen: see :func:`share_a`.
    """
    import peft

    def config(r: int):
        return peft.LoraConfig(r=r, lora_alpha=lora_cfg.alpha * r / lora_cfg.r, lora_dropout=lora_cfg.dropout,
                               target_modules=_targets(lora_cfg.target_modules), task_type="CAUSAL_LM", bias="none")

    def rank_of(name: str) -> int:
        return lora_cfg.r if task_r is None or name == SHARED else task_r

    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, config(rank_of(names[0])), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, config(rank_of(name)))
    for n, p in pm.named_parameters():
        p.requires_grad = "lora_" in n
    if lora_cfg.shared_a:
        share_a(pm, [n for n in names if n != SHARED])
    activate(pm, names[0])
    return pm


def share_a(model, names: list[str]) -> None:
    """Give adapters ``names`` one A per LoRA layer (the first one's) and freeze it: their updates
    B_t·A then live in one row space, and Σ_t w_t·B_t·A = (Σ_t w_t·B_t)·A, so averaging B is exact task
    arithmetic. A stays frozen because a trained A would drift apart per task. Before
    ``deepspeed.initialize``: the optimizer only ever sees the B matrices."""
    for layer in tuner_layers(model):
        first = layer.lora_A[names[0]].weight
        for name in names:
            a = layer.lora_A[name].weight
            with torch.no_grad():
                a.copy_(first)
            a.requires_grad = False


def trainable(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer steps (the frozen A of ``lora.shared_a`` has no gradient nor optimizer
    state: surgery, coupling and absent-adapter bookkeeping must skip it)."""
    return {n: p for n, p in params.items() if p.requires_grad}


def _targets(modules: list[str]):
    return "all-linear" if modules == ["all-linear"] else list(modules)


def tuner_layers(model) -> list:
    """The LoRA layers of ``model`` (collect once when switching per micro-batch)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def activate(model, names: str | list[str], layers: list | None = None) -> None:
    """Make every LoRA layer apply ``names``, without touching ``requires_grad``."""
    names = [names] if isinstance(names, str) else list(names)
    for layer in layers if layers is not None else tuner_layers(model):
        layer._active_adapter = names


def lora_parameters(model, name: str | None = None) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of adapter ``name`` (all adapters when None), by full parameter name.

    Matched on the ``lora_A.<name>.`` segment, so a task called ``mlp`` or ``0`` selects only its own.
    """
    pattern = re.compile(rf"\.lora_[AB]\.{re.escape(name)}\." if name is not None else r"\.lora_[AB]\.")
    return {n: p for n, p in model.named_parameters() if pattern.search(n)}


def rename_adapter_key(key: str, old: str, new: str) -> str:
    """The same LoRA parameter of another adapter."""
    return re.sub(rf"\.lora_([AB])\.{re.escape(old)}\.", rf".lora_\1.{new}.", key)


def gathered_adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    """Full (un-partitioned) CPU copies of adapter ``name``'s tensors, keyed as PEFT saves them.

    Collective under ZeRO-3: every rank must call it. ``GatheredParameters`` is a no-op for
    parameters DeepSpeed does not partition (ZeRO-0/1/2, or a plain model).
    """
    import deepspeed
    from peft.utils import get_peft_model_state_dict

    params = lora_parameters(model, name)
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        full = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    state = get_peft_model_state_dict(model, state_dict=full, adapter_name=name, save_embedding_layers=False)
    for key, tensor in state.items():
        if tensor.numel() == 0:
            raise RuntimeError(f"adapter {name!r}: {key} gathered empty; refusing to save a hollow adapter")
    return state


def save_adapter(model, name: str, out_dir: str | os.PathLike, base_model: str, is_writer: bool) -> None:
    """Write adapter ``name`` to ``out_dir`` in the standard PEFT layout
    (adapter_config.json + adapter_model.safetensors), loadable by ``PeftModel.from_pretrained``.

    Collective (gathers ZeRO-3 partitions); only ``is_writer`` writes.
    """
    state = gathered_adapter_state(model, name)
    if is_writer:
        write_adapter_dir(model.peft_config[name], state, Path(out_dir), base_model)


def write_adapter_dir(config, state: dict[str, torch.Tensor], out: Path, base_model: str) -> Path:
    """PEFT layout, written to a temporary directory and renamed: a crash never leaves a
    complete-looking partial adapter."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.deepcopy(config)
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    config.save_pretrained(str(tmp))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    shapes = {k: list(v.shape) for k, v in state.items()}
    (tmp / "mtl_scale_adapter.json").write_text(json.dumps({"tensors": shapes}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
