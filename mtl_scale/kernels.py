"""Optional GPU kernels: Liger's Triton kernels for RMSNorm, RoPE, SwiGLU and the fused linear
cross-entropy (``model.liger_kernels``).

Liger patches transformers' modeling classes of one architecture (``apply_liger_kernel_to_<type>``), so it
is applied before the model is built. Its kernels are Triton: CUDA GPUs only. On a CPU rank, or without the
package, the run stops before the process group exists, saying so.

The fused linear cross-entropy replaces the model's loss: in training, the patched forward never builds the
(tokens x vocabulary) logits and takes the loss from the last hidden states and ``lm_head.weight``
chunk by chunk. The engine then passes the labels to the model and reads the summed loss back
(``formatting.summed_loss``, tested equal to the logits path). The patched forward reads
``lm_head.weight`` without calling lm_head, so ZeRO-3, which gathers a module's parameters around its
own forward, would hand it an empty shard: ``gather_lm_head_for_fused_loss`` registers it as an
external parameter of the causal-LM module, gathered around that module's forward instead.
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
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)


def gather_lm_head_for_fused_loss(model) -> None:
    """ZeRO-3: gather ``lm_head.weight`` with the causal-LM module (the PEFT-wrapped model's base), whose
    patched forward reads it directly for the fused loss."""
    import deepspeed

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    deepspeed.zero.register_external_parameter(causal_lm, causal_lm.get_output_embeddings().weight)
