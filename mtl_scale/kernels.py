"""Optional GPU kernels: Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (``model.liger_kernels``).

Liger patches transformers' modeling classes of one architecture (``apply_liger_kernel_to_<type>``), so it
is applied before the model is built. Its kernels are Triton: CUDA GPUs only. On a CPU rank, or without the
package, the run stops before the process group exists, saying so.

Not applied: Liger's fused linear cross-entropy. mtl_scale takes the loss from the logits (a summed,
completion-only NLL scaled per task, engine.py), and under ZeRO-3 the fused loss would also need lm_head
gathered around it; the fused path is not wired into the engine.
"""
from __future__ import annotations

import importlib
import importlib.util

from mtl_scale.errors import UserError


def apply_liger(model_type: str, on_cuda: bool) -> None:
    """Patch the ``model_type`` architecture (config.json's ``model_type``: llama, qwen2, mistral, ...)."""
    if not on_cuda:
        raise UserError("model.liger_kernels=true needs CUDA GPUs (Liger's kernels are Triton); this rank has none. "
                        "Set model.liger_kernels=false on CPU")
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("model.liger_kernels=true needs the liger-kernel package (pip install liger-kernel), "
                        "or set model.liger_kernels=false")
    module = importlib.import_module("liger_kernel.transformers")
    apply = getattr(module, f"apply_liger_kernel_to_{model_type}", None)
    if apply is None:
        known = sorted(n[len("apply_liger_kernel_to_"):] for n in dir(module) if n.startswith("apply_liger_kernel_to_"))
        raise UserError(f"model.liger_kernels=true: Liger has no kernels for model_type {model_type!r}; "
                        f"it has: {', '.join(known)}")
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
