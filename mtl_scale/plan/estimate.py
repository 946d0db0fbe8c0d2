"""Per-GPU memory plan for a LoRA run under DeepSpeed ZeRO: does it fit, and if not, what would.

The command line (launch/plan.py) is mtl_scale/plan/cli.py. Everything is computed from the model's
config.json: the model is instantiated on the meta device (shapes, no weights, no memory), so parameter
counts are exact (mtl_scale/plan/shape.py). Per GPU (W = nodes x GPUs per node, p = bytes of the
training dtype, g = bytes of DeepSpeed's gradient-accumulation dtype, N = trainable LoRA parameters,
b x s tokens per micro-batch):

- frozen base: p per parameter (nf4/fp4: 0.5 B per Linear weight, packed in dtype storage, plus the
  quantisation state: a uint8 absmax per 64 weights, an fp32 absmax per 256 blocks and two code tables
  per Linear; embeddings, norms and lm_head stay in dtype). ZeRO-3 keeps a 1/W partition of every
  parameter, and the whole of each parameter of at most stage3_param_persistence_threshold elements
  (norms; under mtl_scale's "auto" threshold every LoRA matrix), which it leaves gathered after first
  use; ZeRO-0/1/2 keep a whole copy on every GPU. The quantisation state is no nn.Parameter, so ZeRO-3
  does not shard it.
- ZeRO-3 gathered working set at the forward/backward turn: lm_head, plus the last decoder layers
  (base and every adapter: LoRA layers are ZeRO-3 leaves) and the embedding while they come back in
  backward within stage3_max_reuse_distance, plus the prefetch bucket: see zero3_kept_gathered.
  4-bit Linears add the transient dequantised weight of the largest Linear.
- LoRA parameters l x N (l = p, but 4 under ZeRO-3: see built_under_zero_init), gradients g x N, Adam
  12 x N (fp32 master copy + two moments; 8 x N with fp32 and no ZeRO). ZeRO >= 1 divides the optimizer
  by W, >= 2 the gradients, 3 the parameters; offload_optimizer moves optimizer and gradient partitions
  to CPU.
- gradient reduce bucket: DeepSpeed allocates reduce_bucket_size elements for gradient reduction
  (contiguous_gradients): ZeRO-3 in communication_data_type, ZeRO-1/2 in g (twice with overlap_comm).
- task gradient shards: with surgery (or its telemetry) the engine copies this rank's fp32 shard of the
  shared adapter's gradient after each task group (sampling.tasks_per_step = K of them); K - 1 are alive
  during the last group's backward. apply_surgery then holds about 16 K bytes per shard element (the
  copies, their stack, turned into per-task differences in place, and one float64 copy for the Gram
  matrix) after the backward, when activations are gone: Plan.surgery_peak.
- activations: what autograd saves, per token per decoder layer (h hidden, i intermediate, kv = kv
  heads x head_dim, n heads), checked tensor by tensor with saved_tensors_hooks on a PEFT Llama:
    two RMSNorm inputs, upcast to fp32            2 x (4h + 4)
    sdpa / flash: q, k, v, output, fp32 logsumexp p(2h + 2kv) + 4n   (k, v repeated to h when
                                                  sdpa gets a padding mask: p x 4h + 4n)
    eager: q, repeated k and v, fp32 softmax and  p x 3h + (4 + p) n s
           its dtype copy (one copy when fp32)
    SwiGLU: gate output, silu output, up output   3 p i
    Linear inputs, each once (q/k/v share one,    p h (q/k/v), p h (o_proj, eager only: sdpa keeps
      gate/up another): of every Linear under     it anyway), p h (gate/up), p i (down)
      ZeRO-3 (DeepSpeed's zero3_linear_wrap), of
      the LoRA targets otherwise
    LoRA: lora_A outputs; fp32 adapters on a      l r per target per active adapter; + l x in per
      16-bit base cast each target's input        target (fp32 adapters); with lora.dropout > 0
                                                  (l + mask) x in per target and adapter
  plus the final norm's fp32 input (4h), lm_head's input under ZeRO-3 (p h) and, with a padding mask,
  the b x s x s mask. With gradient checkpointing only each layer's input (p h) is kept, and one
  layer is recomputed during backward.
- logits + loss: the engine keeps the logits (p V per token) through backward; the loss's fp32
  log-softmax (4V) and, in backward, its gradient and the logits' fp32 gradient (4V + 4V).
- backward working memory: the larger of the loss's 12 V per token and one recomputed layer under
  gradient checkpointing + about two intermediate-sized fp32 gradients (8 i per token).
- CUDA context + NCCL communicators: a fixed 2 GiB allowance (an assumption; not measured here).

DeepSpeed's own estimators (``estimate_zero3_model_states_mem_needs``, and ZeRO-1/2's
``estimate_zero2_model_states_mem_needs``: the functions behind the ``..._all_cold`` printers, which
return the numbers) are called for the trainable parameters' model states and shown beside ours. They
do not apply to the frozen base: they assume every parameter is trained with Adam in mixed precision
(stage_1_and_2.py: "18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit",
plus 2 B of 16-bit parameters), whereas a frozen base has no gradient and no optimizer state: for
Llama-3.1-8B on 8 GPUs they give 18.8 GiB per GPU of model states that a LoRA run never allocates.
They also leave activations out. docs/MEMORY.md compares all this with measurements.

Pure arithmetic over the config: imports nothing of the trainer or the engine.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from mtl_scale.plan.shape import ModelShape, lora_matrix_numels, lora_param_counts, lora_targets

GiB = 2 ** 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CUDA_OVERHEAD = 2 * GiB  # CUDA context (~0.5-1 GiB) + NCCL communicators and their buffers: an allowance
SURGERY_BYTES = 16  # per shard element and task in apply_surgery: 2 fp32 copies (running sums, their stack) + 1 float64
# Llama-style projection names: which saved tensor feeds each LoRA target (shared inputs are saved once)
ROLE_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}


@dataclass
class PlanInputs:
    """What the plan depends on. The DeepSpeed settings default to ds_configs/zero3.json as mtl_scale
    fills it (None: mtl_scale's fill of "auto" for the model's hidden size h)."""
    model: str
    """A checkpoint directory, a config.json, a hub id, or builtin:tiny-llama."""
    nodes: int = 1
    gpus_per_node: int = 8
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    dtype: str = "bf16"
    quantization: str = "none"
    lora_targets: list[str] = field(default_factory=lambda: list(ROLE_INPUT))
    sharing: str = "hard"
    adapter_ranks: list[int] = field(default_factory=lambda: [16])
    """One rank per adapter: hard [r], soft [r] * K, hybrid [r] + [task_r] * K."""
    active_adapters: int = 1
    """Adapters one forward pass applies (hybrid: shared + the task's)."""
    lora_dropout: float = 0.0
    micro_batch_size: int = 8
    seq_len: int = 512
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    padded: bool = True
    """Micro-batches carry a padding mask (variable-length examples): sdpa then repeats K/V heads."""
    task_gradient_copies: int = 0
    """Task-gradient shards the engine copies per step for surgery or its telemetry
    (sampling.tasks_per_step); 0 without surgery."""
    gpu_memory_gib: float = 80.0
    reuse_distance: int = 10 ** 9
    """ZeRO-3 stage3_max_reuse_distance in elements."""
    prefetch_bucket: int | None = None
    """ZeRO-3 stage3_prefetch_bucket_size in elements; None: 0.9 h^2."""
    persistence_threshold: int | None = None
    """ZeRO-3 stage3_param_persistence_threshold in elements; None: mtl_scale's "auto", 10 h raised to the
    largest LoRA matrix (see ``persistence``)."""
    reduce_bucket: int | None = None
    """ZeRO reduce_bucket_size in elements; None: h^2."""
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    grad_accum_dtype: str | None = "fp32"
    """data_types.grad_accum_dtype; None: the training dtype (DeepSpeed's default)."""
    communication_dtype: str | None = "fp32"
    """communication_data_type; None: the training dtype (DeepSpeed's default)."""
    device: str = "cuda"
    """cuda, or cpu (for bench/memory_check.py): no CUDA context, dropout masks in dtype."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def grad_bytes(self) -> int:
        return DTYPE_BYTES[self.grad_accum_dtype or self.dtype]


@dataclass
class Component:
    name: str
    bytes: int
    note: str
    device: str = "gpu"  # gpu | cpu (offloaded)


@dataclass
class Plan:
    inputs: PlanInputs
    shape: ModelShape
    lora_params: list[int]
    components: list[Component]
    load_peak: int = 0
    """4-bit base under ZeRO-3: transformers loads it without zero.Init, so each rank holds all of it
    until deepspeed.initialize partitions it."""
    surgery_peak: int = 0
    """With surgery: after the last backward (activations freed), apply_surgery's working copies."""
    deepspeed_estimate: dict = field(default_factory=dict)
    suggestions: list[str] = field(default_factory=list)

    @property
    def gpu_total(self) -> int:
        return sum(c.bytes for c in self.components if c.device == "gpu")

    @property
    def peak(self) -> int:
        return max(self.gpu_total, self.load_peak, self.surgery_peak)

    @property
    def cpu_total(self) -> int:
        return sum(c.bytes for c in self.components if c.device == "cpu")

    @property
    def fits(self) -> bool:
        return self.peak <= self.inputs.gpu_memory_gib * GiB

    def group(self, *names: str) -> int:
        return sum(c.bytes for c in self.components if c.name in names and c.device == "gpu")


# ---------------------------------------------------------------------------------------------
# The estimate


def _layer0(targets: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The targets of the first decoder layer, by short name (every layer has the same)."""
    return {n.rsplit(".", 1)[-1]: io for n, io in targets.items() if ".layers.0." in f".{n}"}


def quantized_bytes(shape: ModelShape, p: int) -> tuple[int, int]:
    """(packed weights + everything left in dtype, quantisation state) for a
    4-bit base: 0.5 B per Linear weight; per Linear a uint8 absmax per 64-block, an fp32 absmax per 256
    blocks (double quantisation) and two code tables (16 + 256 fp32)."""
    blocks = [math.ceil(i * o / 64) for i, o in shape.linears.values()]
    state = sum(b + 4 * math.ceil(b / 256) + 4 * (16 + 256) for b in blocks)
    return _whole_base_bytes(shape, 0.5, p), state


def _whole_base_bytes(shape: ModelShape, per_weight: float, p: int) -> int:
    """The whole base: per_weight bytes per Linear weight (p, or 0.5 packed 4-bit), p for the rest."""
    return int(sum(i * o for i, o in shape.linears.values()) * per_weight) + sum(shape.other_param_numels) * p


def persistence(shape: ModelShape, inp: PlanInputs) -> int:
    """stage3_param_persistence_threshold: as set, or mtl_scale's "auto" (ds_config.persistence_threshold:
    10 h raised to keep every LoRA matrix whole, as the trainer fills it from the same sizes)."""
    if inp.persistence_threshold is not None:
        return inp.persistence_threshold
    from mtl_scale.ds_config import persistence_threshold
    return persistence_threshold(shape.hidden, *adapter_and_frozen_sizes(shape, inp.lora_targets, inp.adapter_ranks))


def adapter_and_frozen_sizes(shape: ModelShape, targets: list[str], ranks: list[int]) -> tuple[list[int], list[int]]:
    """(elements of every LoRA matrix, of every weight matrix LoRA wraps): what the persistence threshold
    depends on (zero3_adapters.matrix_sizes counts the same on the real model)."""
    return ([n for r in ranks for n in lora_matrix_numels(shape, targets, r)],
            [i * o for i, o in lora_targets(shape, targets).values()])


def zero3_param_bytes(numels: list[int], element_bytes: float, inp: PlanInputs, threshold: int) -> int:
    """Per-GPU bytes of parameters under ZeRO-3: each one's partition (ceil(numel / W) elements), plus the
    whole of every parameter of at most ``threshold`` (stage3_param_persistence_threshold) elements,
    which ZeRO-3 keeps gathered after its first use (and never releases)."""
    return int(sum((math.ceil(n / inp.world) + (n if n <= threshold else 0)) * element_bytes for n in numels))


def base_param_bytes(shape: ModelShape, inp: PlanInputs) -> tuple[int, int]:
    """(per GPU, whole) bytes of the frozen base's parameters, the quantisation state apart."""
    p = DTYPE_BYTES[inp.dtype]
    per_weight = 0.5 if inp.quantization != "none" else p  # 4-bit: two weights per byte
    whole = _whole_base_bytes(shape, per_weight, p)
    if inp.zero_stage != 3:
        return whole, whole
    linear = [i * o for i, o in shape.linears.values()]
    threshold = persistence(shape, inp)
    return (zero3_param_bytes(linear, per_weight, inp, threshold)
            + zero3_param_bytes(shape.other_param_numels, p, inp, threshold)), whole


def zero3_kept_gathered(shape: ModelShape, inp: PlanInputs) -> tuple[int, int]:
    """(bytes, decoder layers) ZeRO-3 holds gathered at the turn from forward to backward, the peak.

    DeepSpeed releases a module's gathered parameters after use unless they come back within
    stage3_max_reuse_distance elements of the recorded module order. lm_head's next use is its own
    backward, right after the loss, so it stays; decoder layer j-th from the end comes back after
    2 x lm_head + 2 x j layers, so the last layers stay while that is below the distance (1e9: none
    for Llama-3-8B, whose lm_head alone has 525M; all of a small model). Every LoRA layer is a ZeRO-3
    leaf (mtl_scale/zero3_adapters.py): gathered whole, base weight and every adapter's matrices (those
    above the persistence threshold; the rest are whole anyway), and the module order is the same
    whichever adapter is active, so soft and hybrid keep what hard does. The leaves make the
    embedding's output require grad, so the embedding comes back in backward too.
    """
    p = DTYPE_BYTES[inp.dtype]
    quantized = inp.quantization != "none"
    head = shape.vocab * shape.hidden * p  # never quantized, tied or not
    threshold = persistence(shape, inp)
    lora = sum(n for r in inp.adapter_ranks for i, o in _layer0(lora_targets(shape, inp.lora_targets)).values()
               for n in (r * i, o * r) if n > threshold)
    layer = lora * lora_dtype_bytes(inp) + sum(n // 2 if quantized and name in shape.linears else n * p
                                               for name, n in shape.module_params.items()
                                               if ".layers.0." in f".{name}.")
    kept = 0
    while kept < shape.layers and 2 * head + 2 * kept * layer < inp.reuse_distance * p:
        kept += 1
    embedding = head if 2 * head + 2 * kept * layer < inp.reuse_distance * p else 0
    return head + kept * layer + embedding, kept


def built_under_zero_init(inp: PlanInputs) -> bool:
    """ZeRO-3 without 4-bit: transformers builds the model inside deepspeed.zero.Init (a 4-bit model it
    loads without). That has two lasting effects on memory, both measured here:
    - Init replaces torch.nn.functional.linear with zero3_linear_wrap for the rest of the process
      ("This will persist unless manually reset"), whose autograd Function saves every Linear's input,
      frozen base layers included;
    - DeepSpeed then leaves the parameters' dtypes as they are (engine.py, _cast_module_mixed_precision),
      so PEFT's fp32 adapters on a 16-bit base (autocast_adapter_dtype) train in fp32 and cast their
      inputs to fp32. ZeRO-0/1/2 cast everything to the training dtype."""
    return inp.zero_stage == 3 and inp.quantization == "none"


def lora_dtype_bytes(inp: PlanInputs) -> int:
    """Bytes per LoRA parameter as trained (see built_under_zero_init)."""
    return 4 if built_under_zero_init(inp) else DTYPE_BYTES[inp.dtype]


def _input_role(name: str) -> str:
    return ROLE_INPUT.get(name, name)  # unknown projections: their own input


def activation_bytes_per_token(shape: ModelShape, inp: PlanInputs,
                               targets: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Bytes autograd keeps per token: per decoder layer, and once per model (see the module docstring)."""
    p, h, i, n, s = DTYPE_BYTES[inp.dtype], shape.hidden, shape.intermediate, shape.heads, inp.seq_len
    kv = shape.kv_heads * shape.head_dim
    norms = 2 * (4 * h + 4)
    if inp.attn_implementation == "eager":
        attn = p * 3 * h + (4 + (p if p != 4 else 0)) * n * s
    else:
        # sdpa_varlen runs stock sdpa on padded batches (mtl_scale/attention.py)
        repeat = inp.attn_implementation in ("sdpa", "sdpa_varlen") and inp.padded and kv != h
        attn = p * (2 * h + 2 * (h if repeat else kv)) + 4 * n
        if inp.attn_implementation == "sdpa_varlen" and not inp.padded:
            attn += _varlen_extra(inp, h, kv, p)
    mlp = 3 * p * i
    targets, lp, wrap = _layer0(targets), lora_dtype_bytes(inp), built_under_zero_init(inp)
    # Inputs of Linear layers, each saved once however many layers read it (q, k, v share theirs)
    shared = {_input_role(t): io[0] for t, io in _layer0(shape.linears).items()} if wrap else {}
    lora_in = 0
    if inp.lora_dropout > 0:  # each target and adapter keeps its dropped input and the mask
        mask = 1 if inp.device == "cuda" else lp
        lora_in = sum((lp + mask) * io[0] for io in targets.values()) * inp.active_adapters
    elif lp != p:  # fp32 adapters on a 16-bit base: every target saves its own fp32 copy of its input
        lora_in = sum(lp * io[0] for io in targets.values())
    else:
        shared.update({_input_role(t): io[0] for t, io in targets.items()})
    if inp.attn_implementation != "eager":
        shared.pop("attn_out", None)  # sdpa / flash keep the attention output anyway
    ranks = sorted(inp.adapter_ranks)[-inp.active_adapters:]
    lora_out = lp * len(targets) * sum(ranks)
    layer = norms + attn + mlp + p * sum(shared.values()) + lora_in + lora_out
    once = 4 * h + 4 + (p * h if wrap else 0)  # the final norm's fp32 input (and lm_head's input)
    if inp.padded and inp.attn_implementation != "flash_attention_2":
        once += s * (1 if inp.attn_implementation in ("sdpa", "sdpa_varlen") else p)  # the b x s x s mask, per token
    return {"layer": layer, "once": once, "checkpoint": p * h, "backward_layer": 8 * i}


def _varlen_extra(inp: PlanInputs, h: int, kv: int, p: int) -> int:
    """sdpa_varlen on packed rows, bytes per token beyond sdpa's: on a GPU in bf16/fp16, this torch's flash
    varlen kernel (mtl_scale/attention.py) saves what sdpa does, with the KV heads repeated where its
    ``varlen_attn`` takes no ``enable_gqa``; else the loop's per-example outputs, which sdpa saves besides
    their concatenation (o_proj's input)."""
    from mtl_scale import attention  # here, not at the top: importing this module stays free of torch
    kernel = attention.torch_varlen() if inp.device == "cuda" and inp.dtype != "fp32" else None
    if kernel is None:
        return p * h
    return 0 if kernel.gqa else 2 * p * (h - kv)


def estimate(shape: ModelShape, inp: PlanInputs) -> Plan:
    """Every component per GPU (pure arithmetic: no DeepSpeed; plan() adds its estimators)."""
    p, W, tokens = DTYPE_BYTES[inp.dtype], inp.world, inp.micro_batch_size * inp.seq_len
    z3 = inp.zero_stage == 3
    comps: list[Component] = []

    # frozen base
    base, base_whole = base_param_bytes(shape, inp)
    qstate = quantized_bytes(shape, p)[1] if inp.quantization != "none" else 0
    base_note = (f"{inp.quantization}: 0.5 B per Linear weight, the rest {inp.dtype}" if qstate else
                 f"{shape.total_params:,} x {p} B ({inp.dtype})")
    base_where = "cpu" if z3 and inp.offload_params else "gpu"
    comps.append(Component("frozen base parameters", base,
                           base_note + (f" / {W} GPUs (ZeRO-3; small ones whole)" if z3 else
                                        f", whole on every GPU (ZeRO-{inp.zero_stage})"), base_where))
    if qstate:
        comps.append(Component("quantisation state", qstate, "absmax + code tables; no nn.Parameter, so ZeRO-3 "
                                                               "does not shard it"))
    if z3:
        bucket = inp.prefetch_bucket if inp.prefetch_bucket is not None else int(0.9 * shape.hidden ** 2)
        kept_bytes, kept_layers = zero3_kept_gathered(shape, inp)
        work = kept_bytes + bucket * p
        note = (f"{shape.output_head} + {kept_layers} of {shape.layers} layers kept for reuse + prefetch bucket "
                f"{bucket:,} elements")
        if qstate:
            work += p * max(i * o for i, o in shape.linears.values())
            note += " + one dequantised Linear"
        comps.append(Component("ZeRO-3 gathered working set", work, note))

    # trainable LoRA parameters and their model states
    targets = lora_targets(shape, inp.lora_targets)
    lora = lora_param_counts(shape, inp.lora_targets, inp.adapter_ranks)
    N, lp, g = sum(lora), lora_dtype_bytes(inp), inp.grad_bytes
    numels = [n for r in inp.adapter_ranks for n in lora_matrix_numels(shape, inp.lora_targets, r)]
    fp32_note = " (PEFT's fp32, kept by ZeRO-3)" if lp != p else ""
    if z3:
        threshold = persistence(shape, inp)
        whole = sum(n for n in numels if n <= threshold)
        comps.append(Component("LoRA parameters", zero3_param_bytes(numels, lp, inp, threshold),
                               f"{N:,} x {lp} B{fp32_note} / W (ZeRO-3), + {whole / N:.0%} of them whole "
                               f"(persistent: matrices of at most {threshold:,} elements)", base_where))
    else:
        comps.append(Component("LoRA parameters", N * lp, f"{N:,} x {lp} B"))
    off = inp.offload_optimizer and inp.zero_stage >= 1
    grads = sum(math.ceil(n / W) for n in numels) * g if z3 else N * g // (W if inp.zero_stage == 2 else 1)
    comps.append(Component("LoRA gradients", grads, f"{g} B (grad_accum_dtype)"
                           + (" / W (ZeRO>=2)" if inp.zero_stage >= 2 else ""),
                           "cpu" if off and inp.zero_stage >= 2 else "gpu"))
    opt_bytes = 8 if (inp.zero_stage == 0 and p == 4) else 12
    comps.append(Component("optimizer states", N * opt_bytes // (W if inp.zero_stage >= 1 else 1),
                           ("fp32 master + Adam m, v" if opt_bytes == 12 else "Adam m, v (fp32)")
                           + (" / W (ZeRO>=1)" if inp.zero_stage >= 1 else ""), "cpu" if off else "gpu"))
    if inp.zero_stage >= 1 and inp.contiguous_gradients:
        reduce = inp.reduce_bucket if inp.reduce_bucket is not None else shape.hidden ** 2
        comm = DTYPE_BYTES[inp.communication_dtype or inp.dtype] if z3 else g
        copies = 2 if inp.overlap_comm and not z3 else 1
        comps.append(Component("gradient reduce bucket", copies * reduce * comm,
                               f"{copies} x reduce_bucket_size {reduce:,} x {comm} B"))
    shared = lora[0] if inp.sharing != "soft" else 0  # the adapter surgery acts on
    shard = math.ceil(shared / W) if z3 else shared
    if inp.task_gradient_copies and shard:
        comps.append(Component("task gradient shards", (inp.task_gradient_copies - 1) * 4 * shard,
                               f"{inp.task_gradient_copies - 1} of {inp.task_gradient_copies} fp32 copies of "
                               f"{shard:,} shared-adapter gradient elements, held through the last backward"))

    # activations, logits, loss
    act = activation_bytes_per_token(shape, inp, targets)
    if inp.gradient_checkpointing:
        saved = tokens * (shape.layers * act["checkpoint"] + act["once"])
        saved_note = f"checkpointing: {shape.layers} layer inputs x {act['checkpoint']:.0f} B/token"
        backward_layer = tokens * (act["layer"] + act["backward_layer"])
    else:
        saved = tokens * (shape.layers * act["layer"] + act["once"])
        saved_note = f"{shape.layers} layers x {act['layer']:,.0f} B/token ({inp.attn_implementation})"
        backward_layer = tokens * act["backward_layer"]
    comps.append(Component("activations", int(saved), f"{saved_note}, {inp.micro_batch_size} x {inp.seq_len} tokens"))
    comps.append(Component("logits", tokens * shape.vocab * p, f"b x s x {shape.vocab:,} vocab x {p} B, kept "
                                                                 "through backward"))
    candidates = {"fp32 log-softmax + its gradient + fp32 logits gradient (12 B x vocab per token)":
                  tokens * shape.vocab * 12,
                  "one layer recomputed + its gradients": backward_layer}
    note, most = max(candidates.items(), key=lambda kv: kv[1])
    comps.append(Component("backward working memory", int(most), note))
    cuda = CUDA_OVERHEAD if inp.device == "cuda" else 0
    if cuda:
        comps.append(Component("CUDA context + NCCL", cuda, "fixed allowance (assumed, not measured)"))

    result = Plan(inp, shape, lora, comps)
    if qstate and z3:
        result.load_peak = base_whole + qstate + cuda
    if inp.task_gradient_copies and shard:
        step_only = result.group("activations", "backward working memory", "task gradient shards")
        result.surgery_peak = result.gpu_total - step_only + SURGERY_BYTES * inp.task_gradient_copies * shard
    return result


def deepspeed_estimate(shape: ModelShape, inp: PlanInputs, trainable: int, largest_lora: int) -> dict:
    """DeepSpeed's own model-states estimators for the trainable parameters (and, for comparison only,
    for full fine-tuning of every parameter, which is what they assume)."""
    if inp.zero_stage == 0:
        return {"estimator": None, "note": "DeepSpeed has no estimator without ZeRO"}
    if inp.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as est
        kw = dict(cpu_offload=inp.offload_optimizer, cpu_offload_params=inp.offload_params,
                  zero_init=built_under_zero_init(inp))
        lora_cpu, lora_gpu, _ = est(trainable, largest_lora, inp.gpus_per_node, inp.nodes, **kw)
        full_cpu, full_gpu, _ = est(shape.total_params, shape.largest_module[1], inp.gpus_per_node, inp.nodes, **kw)
    else:  # DeepSpeed has no ZeRO-1 estimator; ZeRO-2's differs only in the gradients
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as est
        lora_cpu, lora_gpu = est(trainable, inp.gpus_per_node, inp.nodes, cpu_offload=inp.offload_optimizer)
        full_cpu, full_gpu = est(shape.total_params, inp.gpus_per_node, inp.nodes, cpu_offload=inp.offload_optimizer)
    return {"estimator": f"{est.__module__}.{est.__name__}", "lora_gpu_bytes": lora_gpu, "lora_cpu_bytes": lora_cpu,
            "full_finetune_gpu_bytes": full_gpu, "full_finetune_cpu_bytes": full_cpu}


def plan(shape: ModelShape, inp: PlanInputs) -> Plan:
    """The estimate, DeepSpeed's estimators beside it, and (when it does not fit) what would make it
    fit, each re-estimated."""
    result = estimate(shape, inp)
    targets = lora_targets(shape, inp.lora_targets)
    largest_lora = max(inp.adapter_ranks) * max(max(io) for io in targets.values())
    result.deepspeed_estimate = deepspeed_estimate(shape, inp, sum(result.lora_params), largest_lora)
    result.suggestions = suggestions(shape, inp, result)
    return result


def largest_micro_batch(shape: ModelShape, inp: PlanInputs, limit: int = 2 ** 16) -> int:
    """The largest micro-batch size that fits (0 if not even 1 does). Memory grows with the micro-batch
    (not always linearly: the backward working memory is a max of terms), so double, then bisect."""
    def fits(b: int) -> bool:
        return estimate(shape, dataclasses.replace(inp, micro_batch_size=b)).fits

    if not fits(1):
        return 0
    lo = 1
    while lo < limit and fits(2 * lo):
        lo *= 2
    if lo >= limit:
        return lo
    hi = 2 * lo  # does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def suggestions(shape: ModelShape, inp: PlanInputs, current: Plan) -> list[str]:
    def gib(x: Plan) -> str:
        return f"{x.peak / GiB:.1f} GiB ({'fits' if x.fits else 'does not fit'})"

    out = []
    best = largest_micro_batch(shape, inp)
    if current.fits:
        return [f"largest micro-batch that fits: {best}"] if best > inp.micro_batch_size else []
    out.append(f"micro_batch_size={best} is the largest that fits" if best else
               "no micro-batch size fits with these settings")
    options = []
    if not inp.gradient_checkpointing:
        options.append(("gradient checkpointing", dict(gradient_checkpointing=True)))
    # With per-task adapters, optimizer offload is exact only under ZeRO-3 (ds_config refuses it at 1-2)
    if inp.zero_stage >= 1 and not inp.offload_optimizer and (inp.zero_stage == 3 or inp.sharing == "hard"):
        options.append(("offload the optimizer", dict(offload_optimizer=True)))
    if inp.zero_stage == 3 and not inp.offload_params:
        options.append(("offload optimizer + parameters", dict(offload_optimizer=True, offload_params=True)))
    if inp.zero_stage < 3:
        options.append(("ZeRO-3", dict(zero_stage=3)))
    if inp.quantization == "none":
        options.append(("nf4 quantisation (QLoRA)", dict(quantization="nf4")))
    for label, change in options:
        alt = dataclasses.replace(inp, **change)
        b = largest_micro_batch(shape, alt)
        out.append(f"{label}: {gib(estimate(shape, alt))}" + (f"; largest micro-batch {b}" if b else ""))
    if current.load_peak > inp.gpu_memory_gib * GiB:
        out.append(f"at load each rank holds the whole 4-bit base ({current.load_peak / GiB:.1f} GiB) before ZeRO-3 "
                   "partitions it, so more GPUs do not help: use GPUs with more memory")
    elif inp.zero_stage == 3:
        more = next((n for n in range(inp.nodes + 1, 65)
                     if estimate(shape, dataclasses.replace(inp, nodes=n)).fits), None)
        out.append(f"more GPUs: {more} nodes x {inp.gpus_per_node} GPUs fit" if more else
                   "more GPUs: not even 64 nodes fit (only what ZeRO-3 shards shrinks with more GPUs; "
                   "activations, logits and the loss do not)")
    return out
