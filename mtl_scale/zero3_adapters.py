"""How switching LoRA adapters meets ZeRO-3: each LoRA layer is one ZeRO-3 leaf module, and only the
active adapters' gradients are reduced.

Why. ZeRO-3 records the order in which submodules run and, once two passes agree, prefetches
parameters along that trace. A LoRA layer runs its base linear plus the ``lora_A.<name>`` /
``lora_B.<name>`` submodules of the *active* adapters, so in soft and hybrid sharing every task switch
runs other submodules, the trace never completes, and ZeRO-3 falls back to fetching parameter by
parameter (docs/BENCHMARKS.md: 8,577 all-gathers per 25 steps against 1,753 for hard sharing, and
a step twice as long). A leaf module is fetched as one unit, base weight and every adapter together,
and its children are not traced, so the trace is the same whatever adapter is active. Hard sharing
gains too: one fetch and no per-submodule hooks where there were three.

The price of leaves. ZeRO-3 reduces a leaf's gradients in one full backward hook on the leaf, and
fills the gradient of every parameter that got none with zeros first (meant for MoE experts a
batch did not route to). For us that is every inactive adapter at every micro-batch: K−1 adapters'
worth of zero gradients reduce-scattered for nothing, which would keep soft sharing behind hard.
``skip_inactive_reductions`` drops them instead. That leaves ZeRO-3 exactly where it is without
leaves: an inactive adapter's gradient partition is never touched in that micro-batch, which is
what ``engine.clear_stale_grad_partitions`` already relies on. All ranks run the same task at each
micro-step (engine.optimizer_step), so all skip the same reductions and the collectives match.

A full backward hook fires once the gradients for the module's *inputs* are ready; when no input
needs a gradient (the first layer's projections: embeddings are frozen) it fires before the weight
gradients exist. ``enable_input_require_grads`` makes the embedding output require a gradient, at
the cost of the input gradients of the first layer.
"""
from __future__ import annotations

import functools

from mtl_scale import adapters


def mark_lora_leaves(model) -> None:
    """Before ``deepspeed.initialize``: every LoRA layer a ZeRO-3 leaf module."""
    from deepspeed.utils import set_z3_leaf_module

    layers = adapters.tuner_layers(model)
    for layer in layers:
        set_z3_leaf_module(layer, True)
    if layers:
        model.enable_input_require_grads()


def skip_inactive_reductions(optimizer, model) -> None:
    """After ``deepspeed.initialize``: ZeRO-3 reduces a LoRA parameter's gradient only if its adapter
    is active in its LoRA layer (see the module docstring).

    Wraps the optimizer's ``reduce_ready_partitions_and_remove_grads``, the one call through which
    both DeepSpeed's per-parameter hooks and its leaf-module hook hand a gradient to ZeRO-3.
    """
    reduce = getattr(optimizer, "reduce_ready_partitions_and_remove_grads", None)
    if reduce is None:
        raise RuntimeError("this DeepSpeed version's ZeRO-3 optimizer has no reduce_ready_partitions_and_remove_grads:"
                           " mtl_scale cannot skip inactive adapters' reductions (see zero3_adapters.py); use "
                           "DeepSpeed 0.17-0.19")
    owner = {id(p): (name, layer)  # LoRA parameter -> (its adapter, the LoRA layer that applies it)
             for layer in adapters.tuner_layers(model) for matrices in (layer.lora_A, layer.lora_B)
             for name, module in matrices.items() for p in module.parameters()}

    @functools.wraps(reduce)
    def reduce_if_active(param):
        name, layer = owner.get(id(param), (None, None))
        if layer is not None and name not in layer.active_adapters:
            param.grad = None  # ZeRO-3's zero fill: this adapter took no part in the micro-batch
            return
        reduce(param)

    optimizer.reduce_ready_partitions_and_remove_grads = reduce_if_active
