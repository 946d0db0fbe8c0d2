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

Whole LoRA matrices. A leaf still gathers and releases every adapter's matrices around each use,
with DeepSpeed's bookkeeping per tensor: K adapters, K times hard sharing's (profiled in
docs/BENCHMARKS.md). The "auto" persistence threshold (``ds_config.persistence_threshold``) keeps the
LoRA matrices whole on every rank instead, as ZeRO-3 keeps norms: never gathered in forward or
backward, partitioned for the optimizer step and gathered after it. DeepSpeed gathers its persistent
parameters one collective per tensor (``_allgather_params_coalesced`` launches one per parameter);
``coalesce_persistent_gather`` makes that one flat all-gather, the one ZeRO-3's module fetch uses.
What stays per adapter tensor is Python: ZeRO-3 walks a leaf's submodules to list its parameters at
each fetch and release (``cache_parameter_lists`` lists them once) and loops over them.
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


def matrix_sizes(model) -> tuple[list[int], list[int]]:
    """Before ``deepspeed.initialize``: (elements of every LoRA matrix, of every frozen weight matrix the
    LoRA layers wrap), for ``ds_config.persistence_threshold``."""
    lora, frozen = [], []
    for layer in adapters.tuner_layers(model):
        for name, p in layer.named_parameters():
            # a base built under zero.Init is partitioned already: its ds_ sizes are the whole tensor's
            numel, shape = getattr(p, "ds_numel", p.numel()), getattr(p, "ds_shape", p.shape)
            if ".lora_" in f".{name}":
                lora.append(numel)
            elif len(shape) >= 2:  # a weight matrix, not a bias
                frozen.append(numel)
    return lora, frozen


def skip_inactive_reductions(optimizer, model) -> None:
    """After ``deepspeed.initialize``: ZeRO-3's leaf hook reduces only the active adapters' gradients (see
    the module docstring).

    The hook loops over ``optimizer.leaf_parameters[layer]``, the very list it was made with. A forward
    pre-hook on each LoRA layer narrows that list, in place, to the parameters of the adapters this
    forward applies; the backward that follows is this forward's (gradient checkpointing re-runs the
    same forward). Inactive adapters then get neither DeepSpeed's zero fill nor a reduction: no work
    per inactive tensor at all.
    """
    leaf_parameters = getattr(optimizer, "leaf_parameters", None)
    if leaf_parameters is None:
        raise RuntimeError("this DeepSpeed version's ZeRO-3 optimizer has no leaf_parameters: mtl_scale cannot "
                           "skip inactive adapters' reductions (see zero3_adapters.py); use DeepSpeed 0.17-0.19")
    for layer in adapters.tuner_layers(model):
        params = leaf_parameters.get(layer)
        if params is None:
            continue
        adapter_of = {id(p): name for matrices in (layer.lora_A, layer.lora_B)
                      for name, module in matrices.items() for p in module.parameters()}
        every = tuple(params)
        by_active: dict[tuple[str, ...], list] = {}

        def narrow(module, _args, params=params, every=every, adapter_of=adapter_of, by_active=by_active):
            active = tuple(module.active_adapters)
            if active not in by_active:  # parameters of no adapter (none in a LoRA layer today) always stay
                by_active[active] = [p for p in every if adapter_of.get(id(p), active[0]) in active]
            params[:] = by_active[active]

        layer.register_forward_pre_hook(narrow)


def cache_parameter_lists(model) -> None:
    """ZeRO-3 lists a leaf's parameters (``named_parameters()``: a walk over the LoRA layer's submodules,
    dropout, A and B of every adapter) several times at each fetch and release, so K adapters cost K
    times the walking. A LoRA layer's parameters do not change once the adapters are attached: each
    layer answers the default call from a list taken now (any other call as before)."""
    for layer in adapters.tuner_layers(model):
        listed = tuple(layer.named_parameters())

        def named_parameters(prefix="", recurse=True, remove_duplicate=True, listed=listed,
                             walk=layer.named_parameters):
            if prefix == "" and recurse and remove_duplicate:
                return iter(listed)
            return walk(prefix, recurse, remove_duplicate)

        layer.named_parameters = named_parameters


def coalesce_persistent_gather(optimizer) -> None:
    """After ``deepspeed.initialize``: gather ZeRO-3's persistent parameters after each optimizer step in
    one flat all-gather (``all_gather_coalesced``, as a module fetch does) instead of one per tensor.

    Wraps the optimizer's ``_post_step``, which does that gather and nothing else that depends on it.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    post_step = getattr(optimizer, "_post_step", None)
    if post_step is None or not hasattr(optimizer, "persistent_parameters"):
        raise RuntimeError("this DeepSpeed version's ZeRO-3 optimizer has no _post_step / persistent_parameters: "
                           "mtl_scale cannot coalesce the persistent gather (see zero3_adapters.py); use "
                           "DeepSpeed 0.17-0.19")

    @functools.wraps(post_step)
    def post_step_coalesced(*args, **kwargs):
        persistent = optimizer.persistent_parameters
        optimizer.persistent_parameters = []  # DeepSpeed's own gather skipped ...
        try:
            post_step(*args, **kwargs)
        finally:
            optimizer.persistent_parameters = persistent
        # ... and done here: the step left them partitioned. Quantized partitions keep DeepSpeed's path.
        todo = [p for p in persistent if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        flat = [p for p in todo if not hasattr(p.ds_tensor, "ds_quant_scale")]
        if flat:
            flat[0].all_gather_coalesced(flat).wait()
        if len(flat) < len(todo):
            todo[0].all_gather([p for p in todo if hasattr(p.ds_tensor, "ds_quant_scale")])

    optimizer._post_step = post_step_coalesced
