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
backward. ZeRO-3 would still free every persistent parameter before each optimizer step and gather them
back after it, one tensor at a time (DeepSpeed's Python per tensor, K times for K adapters, and on
CUDA the largest part of soft sharing's extra time); ``keep_persistent_gathered`` keeps them whole
through the step and refreshes the trainable ones with one all-gather into one buffer. What stays per
adapter tensor is Python: ZeRO-3 walks a leaf's submodules to list its parameters at each fetch and
release (``cache_parameter_lists`` lists them once) and loops over them.
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


def keep_persistent_gathered(optimizer) -> None:
    """After ``deepspeed.initialize``: ZeRO-3's persistent parameters stay whole through the optimizer step;
    the trainable ones are refreshed from their updated partitions by one all-gather into the memory they
    already have.

    ZeRO-3 frees every persistent parameter before each step (``_partition_all_parameters``: DeepSpeed's
    bookkeeping per tensor, ~0.1 ms each on CPU, ~0.25 ms on CUDA, so K adapters cost K times) and gathers
    all of them back after it (``_post_step``: one collective and one new tensor per parameter). The step
    itself reads and writes only the partitions (``ds_tensor``), never a whole tensor, so neither is needed:
    - the pre-step release leaves them alone; the frozen ones (norms) never change and are never gathered
      again;
    - after the step the trainable ones' partitions go into one flat all-gather, and one ``_foreach_copy_``
      puts each parameter's pieces in place in one buffer whose views the parameters are.
    What else frees them (checkpoint save and load, ``GatheredParameters`` when an adapter is exported)
    does so as before and DeepSpeed gathers them back its way; the next post-step moves them into the
    buffer again. Partitions that cannot be gathered this way (ZeRO++ quantized, hpZ secondary, a
    communication dtype, offloaded parameters) keep DeepSpeed's own gather.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, get_allgather_dtype

    if not all(hasattr(optimizer, a) for a in ("_post_step", "_partition_all_parameters", "persistent_parameters")):
        raise RuntimeError("this DeepSpeed version's ZeRO-3 optimizer has no _post_step / _partition_all_parameters / "
                           "persistent_parameters: mtl_scale cannot keep persistent parameters gathered (see "
                           "zero3_adapters.py); use DeepSpeed 0.17-0.19")
    AVAILABLE, NOT_AVAILABLE = ZeroParamStatus.AVAILABLE, ZeroParamStatus.NOT_AVAILABLE
    persistent = list(optimizer.persistent_parameters)
    if not persistent or getattr(optimizer, "offload_param", False):
        return  # offloaded partitions live on the host: DeepSpeed's path

    def plain(p):
        return (getattr(p, "ds_secondary_tensor", None) is None and not hasattr(p.ds_tensor, "ds_quant_scale")
                and get_allgather_dtype(p, p.ds_tensor) == p.ds_tensor.dtype == p.dtype)

    trainable = [p for p in persistent if p.requires_grad and plain(p)]
    first = trainable[0] if trainable else None
    mine = [p for p in trainable if p.ds_process_group is first.ds_process_group and p.dtype == first.dtype]
    kept = mine + [p for p in persistent if not p.requires_grad and plain(p)]
    kept_ids = {id(p) for p in kept}
    theirs = [p for p in persistent if id(p) not in kept_ids]  # gathered by DeepSpeed after each step

    gather_mine = _one_buffer_gather(mine) if mine else None
    if gather_mine:
        gather_mine()  # now: the first forward finds them whole, in the buffer

    partition_all = optimizer._partition_all_parameters

    def partition_all_but_kept():
        hidden = [p for p in kept if p.ds_status is AVAILABLE]
        for p in hidden:
            p.ds_status = NOT_AVAILABLE  # DeepSpeed releases AVAILABLE parameters only
        try:
            partition_all()
        finally:
            for p in hidden:
                p.ds_status = AVAILABLE

    step = optimizer.step

    @functools.wraps(step)
    def step_keeping(*args, **kwargs):
        optimizer._partition_all_parameters = partition_all_but_kept  # the step's release only, not a checkpoint's
        try:
            return step(*args, **kwargs)
        finally:
            optimizer._partition_all_parameters = partition_all

    post_step = optimizer._post_step

    @functools.wraps(post_step)
    def post_step_kept(*args, **kwargs):
        optimizer.persistent_parameters = theirs
        try:
            post_step(*args, **kwargs)
        finally:
            optimizer.persistent_parameters = persistent
        if gather_mine:
            gather_mine()

    optimizer.step = step_keeping
    optimizer._post_step = post_step_kept


def _one_buffer_gather(params):
    """Make ``params`` (ZeRO-3 parameters of one process group and dtype) views of one buffer, and return
    the call that fills it from their partitions: one all-gather and one ``_foreach_copy_``. Collective."""
    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    group = params[0].ds_process_group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [p.ds_tensor.ds_numel for p in params]  # partition sizes, padded alike on every rank
    total, dtype, device = sum(sizes), params[0].dtype, params[0].ds_tensor.device
    # Parameter-major: parameter i's block holds its `world` partitions in rank order, so its whole tensor
    # is the block's first ds_numel elements (the rest is the last partition's padding).
    blocks = torch.empty(world * total, dtype=dtype, device=device).split([world * n for n in sizes])
    views = [block[:p.ds_numel].view(p.ds_shape) for block, p in zip(blocks, params)]
    by_rank = [block.view(world, n) for block, n in zip(blocks, sizes)]

    def gather():
        gathered = torch.empty(world * total, dtype=dtype, device=device)  # rank-major, as all-gather writes
        own = gathered.narrow(0, rank * total, total)
        torch.cat([p.ds_tensor for p in params], out=own)
        dist.all_gather_into_tensor(gathered, own, group=group)
        torch._foreach_copy_(by_rank, list(gathered.view(world, total).split(sizes, dim=1)))
        for p, view in zip(params, views):
            p.data = view  # already so, unless a checkpoint or an export freed it since
            p.ds_status = ZeroParamStatus.AVAILABLE

    return gather
