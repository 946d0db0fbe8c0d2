"""Per-GPU memory plan for a LoRA run under DeepSpeed ZeRO: does it fit, and if not, what would.

    python launch/plan.py --config configs/llama3_8b_8gpu.yaml --gpu-memory 80
    python launch/plan.py --model configs/models/llama-3.1-70b.json --nodes 2 --micro-batch-size 1 --json

Everything is computed from the model's config.json: the model is instantiated on the meta device
(shapes, no weights, no memory), so parameter counts are exact. Per GPU (W = nodes x GPUs per node,
p = bytes of the training dtype, g = bytes of DeepSpeed's gradient-accumulation dtype, N = trainable
LoRA parameters, b x s tokens per micro-batch):

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

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mtl_scale.config import DTYPES, QUANTIZATION, TINY_MODEL, RunConfig, load_config
from mtl_scale.errors import UserError

GiB = 2 ** 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# DeepSpeed's spellings of data_types.grad_accum_dtype and communication_data_type (runtime/config.py)
DS_DTYPES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
             "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
             "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16"}
OFFLOADS = ("none", "optimizer", "optimizer+params")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
CUDA_OVERHEAD = 2 * GiB  # CUDA context (~0.5-1 GiB) + NCCL communicators and their buffers: an allowance
SURGERY_BYTES = 16  # per shard element and task in apply_surgery: 2 fp32 copies (running sums, their stack) + 1 float64
CHECKOUT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = CHECKOUT / "configs" / "models"
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
class ModelShape:
    source: str
    architecture: str
    total_params: int
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    linears: dict[str, tuple[int, int]]
    """Every nn.Linear but the output head: name -> (in_features, out_features)."""
    output_head: str
    largest_module: tuple[str, int]
    """The module with the most parameters of its own (DeepSpeed's "largest layer")."""
    module_params: dict[str, int]
    """Own parameter count of every module that has parameters."""
    other_param_numels: list[int] = field(default_factory=list)
    """Sizes of the parameters that are no weight of ``linears`` (embeddings, lm_head, norms, biases)."""


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
# The model: config -> exact shapes on the meta device


def load_model_config(model: str, trust_remote_code: bool = False):
    """(transformers config, where it came from) for a checkpoint dir, a config.json, a hub id or the
    built-in tiny model. A hub id the hub cannot resolve falls back to a shipped copy of its
    architecture in configs/models/ (matched by name, -Instruct ignored)."""
    from transformers import AutoConfig
    if model == TINY_MODEL:
        from mtl_scale.model import ensure_tiny_model
        model = str(ensure_tiny_model())
    p = Path(model).expanduser()
    if p.is_file() or p.is_dir():
        if p.is_dir() and not (p / "config.json").is_file():
            raise UserError(f"--model {model}: a directory without config.json; pass a checkpoint directory "
                            "or a config.json file")
        try:
            return AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code), str(p)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--model {model}: not a model config.json transformers can read: {e}") from None
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".json"):
        raise UserError(f"--model {model}: no such file or directory; pass a local checkpoint directory or a "
                        f"config.json (shipped: {', '.join(shipped_model_configs())})")
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True, trust_remote_code=trust_remote_code), model
    except (OSError, ValueError):
        pass
    shipped = SHIPPED_MODELS / f"{model.split('/')[-1].lower().removesuffix('-instruct')}.json"
    if shipped.is_file():
        return AutoConfig.from_pretrained(str(shipped)), f"{shipped.relative_to(CHECKOUT)} (architecture of {model})"
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code), model
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model}: cannot resolve this hub id ({str(e).splitlines()[0]}); pass a local "
                        f"checkpoint directory or its config.json "
                        f"(shipped: {', '.join(shipped_model_configs())})") from None


def shipped_model_configs() -> list[str]:
    return sorted(str(f.relative_to(CHECKOUT)) for f in SHIPPED_MODELS.glob("*.json"))


def model_shape(hf_config, source: str = "") -> ModelShape:
    """Instantiate the model on the meta device and read its shapes (no weights are allocated)."""
    import torch
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except ValueError as e:
        raise UserError(f"{source}: {type(hf_config).__name__} is not a causal language model ({e})") from None
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), "lm_head")
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != head_name}
    seen, total, own, other = set(), 0, {}, []
    for name, module in model.named_modules():
        n = 0
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:  # tied weights count once
                seen.add(id(p))
                n += p.numel()
                if not (name in linears and pname == "weight"):
                    other.append(p.numel())
        if n:
            own[name] = n
            total += n
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if getattr(c, k, None) is None]
    if missing:
        raise UserError(f"{source}: the activation formula is for Llama-style decoders; this config has no "
                        f"{', '.join(missing)}")
    heads = c.num_attention_heads
    return ModelShape(
        source=source, architecture=type(model).__name__, total_params=total, vocab=c.vocab_size,
        hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers, heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        linears=linears, output_head=head_name, largest_module=max(own.items(), key=lambda kv: kv[1]),
        module_params=own, other_param_numels=other)


def lora_targets(shape: ModelShape, targets: list[str]) -> dict[str, tuple[int, int]]:
    """The Linear layers PEFT would wrap: name == target or name ends with "." + target; all-linear is
    every Linear but the output head."""
    if targets == ["all-linear"]:
        return dict(shape.linears)
    found = {n: io for n, io in shape.linears.items() if any(n == t or n.endswith("." + t) for t in targets)}
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in found)]
    if unmatched:
        names = sorted({n.rsplit(".", 1)[-1] for n in shape.linears})
        raise UserError(f"lora.target_modules / --lora-targets: {', '.join(unmatched)} matches no Linear layer of "
                        f"{shape.architecture}; its Linear layers: {', '.join(names)} (or all-linear)")
    return found


def lora_matrix_numels(shape: ModelShape, targets: list[str], rank: int) -> list[int]:
    """Sizes of one adapter's matrices: lora_A (r x in) and lora_B (out x r) of every targeted Linear."""
    return [n for i, o in lora_targets(shape, targets).values() for n in (rank * i, o * rank)]


def lora_param_counts(shape: ModelShape, targets: list[str], ranks: list[int]) -> list[int]:
    """Trainable parameters per adapter: r x (in + out) for every targeted Linear."""
    return [sum(lora_matrix_numels(shape, targets, r)) for r in ranks]


def _layer0(targets: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The targets of the first decoder layer, by short name (every layer has the same)."""
    return {n.rsplit(".", 1)[-1]: io for n, io in targets.items() if ".layers.0." in f".{n}"}


# ---------------------------------------------------------------------------------------------
# The estimate


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
        repeat = inp.attn_implementation == "sdpa" and inp.padded and kv != h
        attn = p * (2 * h + 2 * (h if repeat else kv)) + 4 * n
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
        once += s * (1 if inp.attn_implementation == "sdpa" else p)  # the b x s x s mask, per token
    return {"layer": layer, "once": once, "checkpoint": p * h, "backward_layer": 8 * i}


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


def _deepspeed_formula(inp: PlanInputs) -> str:
    """What DeepSpeed's estimator counts on the GPU, in its own terms (stage3.py / stage_1_and_2.py)."""
    if inp.zero_stage == 3:
        states = ("" if inp.offload_params else " + 2 B x N / W (16-bit params)" if inp.offload_optimizer
                  else " + 18 B x N / W")
        return "4 B x the largest LoRA matrix" + states
    return "2 B x N (16-bit params, whole)" + ("" if inp.offload_optimizer else " + 18 B x N / W")


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
    if inp.zero_stage >= 1 and not inp.offload_optimizer:
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


# ---------------------------------------------------------------------------------------------
# Output


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2 ** 20:.1f} MiB"


def render(result: Plan) -> str:
    inp, sh = result.inputs, result.shape
    off = "optimizer+params" if inp.offload_params else "optimizer" if inp.offload_optimizer else "none"
    ranks = sorted(set(inp.adapter_ranks))
    lines = [
        f"model: {sh.architecture} from {sh.source}: {sh.total_params:,} parameters; largest module "
        f"{sh.largest_module[0]} ({sh.largest_module[1]:,})",
        f"world: {inp.nodes} node(s) x {inp.gpus_per_node} GPUs = {inp.world}, ZeRO-{inp.zero_stage}, offload {off}, "
        f"{inp.dtype}, quantization {inp.quantization}",
        f"LoRA, sharing={inp.sharing}: {len(inp.adapter_ranks)} adapter(s) of rank {'/'.join(map(str, ranks))} on "
        f"{','.join(inp.lora_targets)}: {sum(result.lora_params):,} trainable parameters",
        f"micro-batch {inp.micro_batch_size} x {inp.seq_len} tokens, {inp.attn_implementation} attention, gradient "
        f"checkpointing {'on' if inp.gradient_checkpointing else 'off'}", ""]
    width = max(len(c.name) for c in result.components) + 2
    lines.append(f"{'component':<{width}}{'per GPU':>12}  note")
    for c in result.components:
        where = "  [CPU]" if c.device == "cpu" else ""
        lines.append(f"{c.name:<{width}}{_size(c.bytes):>12}  {c.note}{where}")
    lines.append(f"{'total on the GPU':<{width}}{_size(result.gpu_total):>12}")
    if result.load_peak:
        lines.append(f"{'at load (4-bit, whole)':<{width}}{_size(result.load_peak):>12}  transformers loads a "
                     "quantized model without zero.Init: each rank holds all of it until deepspeed.initialize "
                     "partitions it")
    if result.surgery_peak:
        lines.append(f"{'at the surgery':<{width}}{_size(result.surgery_peak):>12}  after the last backward: the "
                     f"task-gradient copies, their differences and float64 copies for the Gram matrix")
    if result.cpu_total:
        lines.append(f"{'offloaded to CPU':<{width}}{_size(result.cpu_total):>12}  per GPU; "
                     f"x {inp.gpus_per_node} per node")
    ds = result.deepspeed_estimate
    if ds.get("estimator"):
        ours = result.group("LoRA parameters", "LoRA gradients", "optimizer states")
        estimator = ds["estimator"].rsplit(".", 1)[-1]
        lines += ["", f"LoRA model states per GPU: ours {_size(ours)}; DeepSpeed's {estimator}: "
                      f"{_size(ds['lora_gpu_bytes'])} ({_deepspeed_formula(inp)})",
                  f"(the same estimator for full fine-tuning of all {sh.total_params:,} parameters: "
                  f"{_size(ds['full_finetune_gpu_bytes'])} per GPU — it does not apply to a frozen base)"]
    headroom = inp.gpu_memory_gib * GiB - result.peak
    lines += ["", f"fits in {inp.gpu_memory_gib:g} GiB: {'yes' if result.fits else 'no'} "
                  f"(headroom {headroom / GiB:+.1f} GiB)"]
    lines += [f"  - {s}" for s in result.suggestions]
    return "\n".join(lines)


def to_json(result: Plan) -> dict:
    return {
        "inputs": dataclasses.asdict(result.inputs),
        "model": {k: v for k, v in dataclasses.asdict(result.shape).items()
                  if k not in ("linears", "module_params", "other_param_numels")},
        "lora_params_per_adapter": result.lora_params,
        "components": [dataclasses.asdict(c) for c in result.components],
        "gpu_total_bytes": result.gpu_total, "load_peak_bytes": result.load_peak,
        "surgery_peak_bytes": result.surgery_peak, "peak_bytes": result.peak,
        "cpu_total_bytes": result.cpu_total,
        "gpu_memory_bytes": int(result.inputs.gpu_memory_gib * GiB), "fits": result.fits,
        "deepspeed_estimate": result.deepspeed_estimate, "suggestions": result.suggestions,
    }


# ---------------------------------------------------------------------------------------------
# Inputs: run config + flags


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="launch/plan.py", description="Per-GPU memory plan of a LoRA run under "
                                 "DeepSpeed ZeRO. Flags override the run config (--config); key=value overrides "
                                 "apply to the run config.")
    ap.add_argument("--config", help="YAML run config (model.*, lora.*, sharing, tasks, micro_batch_size, "
                                     "max_seq_len, deepspeed_config)")
    ap.add_argument("--model", help="checkpoint directory, config.json, or hub id (default: the config's model.path)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--zero-stage", type=int, help="0-3 (default: the config's deepspeed_config)")
    ap.add_argument("--offload", help=f"{' | '.join(OFFLOADS)} (default: the deepspeed_config's offload_* devices)")
    ap.add_argument("--dtype", help=" | ".join(DTYPES))
    ap.add_argument("--quantization", help=" | ".join(QUANTIZATION))
    ap.add_argument("--lora-r", type=int)
    ap.add_argument("--lora-targets", help="comma-separated module names, or all-linear")
    ap.add_argument("--adapters", type=int, help="number of task adapters K (soft: K; hybrid: shared + K)")
    ap.add_argument("--micro-batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--attn-implementation", help=" | ".join(ATTENTION))
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    return ap


def _allowed(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{flag}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def _choice(flag: str, flag_value, key: str, cfg_value, allowed):
    """The flag's value if given, else the run config's; a bad one named by whichever gave it."""
    value = flag_value if flag_value is not None else cfg_value
    _allowed(flag if flag_value is not None else key, value, allowed)
    return value


def inputs_from_args(args: argparse.Namespace) -> tuple[ModelShape, PlanInputs]:
    """Run config (or defaults) first, flags over it; every bad value names its flag or key."""
    if args.config is None:  # defaults, one placeholder task, bf16 (this plans GPU runs)
        cfg = load_config(None, ["tasks=[{name: task, source: 'builtin:copy'}]", "model.dtype=bf16", *args.overrides])
    else:
        cfg = load_config(args.config, args.overrides)
    hf_config, source = load_model_config(args.model or cfg.model.path, cfg.model.trust_remote_code)
    shape = model_shape(hf_config, source)
    return shape, inputs_from_config(cfg, shape, args)


def inputs_from_config(cfg: RunConfig, shape: ModelShape, args: argparse.Namespace | None = None) -> PlanInputs:
    """PlanInputs of a run config, flags (``build_parser``'s namespace) over it."""
    args = args or build_parser().parse_args([])
    for flag in ("nodes", "gpus_per_node", "lora_r", "adapters", "micro_batch_size", "seq_len", "gpu_memory"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    dtype = _choice("--dtype", args.dtype, "model.dtype", cfg.model.dtype, DTYPES)
    quant = _choice("--quantization", args.quantization, "model.quantization", cfg.model.quantization, QUANTIZATION)
    attn = _choice("--attn-implementation", args.attn_implementation, "model.attn_implementation",
                   cfg.model.attn_implementation, ATTENTION)
    targets = cfg.lora.target_modules
    if args.lora_targets is not None:
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not targets:
        raise UserError("--lora-targets is empty; name modules (q_proj,v_proj) or all-linear")
    lora_targets(shape, targets)  # unknown target names fail here, with the model's Linear names
    if args.adapters and cfg.sharing == "hard":
        raise UserError("--adapters sets the number of per-task adapters; sharing=hard has one shared adapter. "
                        "Use sharing=soft or sharing=hybrid (a key=value override) or leave --adapters out")
    r, k = args.lora_r or cfg.lora.r, args.adapters or len(cfg.tasks)
    ranks = {"hard": [r], "soft": [r] * k, "hybrid": [r] + [cfg.hybrid.task_r] * k}[cfg.sharing]
    zero = _deepspeed_settings(cfg, args.nodes * args.gpus_per_node, shape.hidden,
                               *adapter_and_frozen_sizes(shape, targets, ranks))
    if args.zero_stage is not None:
        _allowed("--zero-stage", args.zero_stage, (0, 1, 2, 3))
        zero["zero_stage"] = args.zero_stage
    if args.offload is not None:
        _allowed("--offload", args.offload, OFFLOADS)
        zero["offload_optimizer"], zero["offload_params"] = args.offload != "none", args.offload == "optimizer+params"
    if zero["offload_optimizer"] and zero["zero_stage"] == 0:
        raise UserError("--offload / offload_optimizer needs ZeRO stage 1, 2 or 3 (--zero-stage)")
    if zero["offload_params"] and zero["zero_stage"] != 3:
        raise UserError("--offload optimizer+params / offload_param needs ZeRO stage 3 (--zero-stage 3): DeepSpeed "
                        "offloads parameters only under ZeRO-3")

    # as mtl_scale.trainer decides: surgery other than sum, or its telemetry, on the shared adapter
    surgery = cfg.surgery.method != "sum" or (cfg.surgery.telemetry and cfg.sharing != "soft")
    if surgery and zero["zero_stage"] != 3:
        raise UserError(f"surgery.method={cfg.surgery.method} / surgery.telemetry work on ZeRO-3's gradient "
                        f"partitions; this plan has ZeRO stage {zero['zero_stage']} (--zero-stage 3)")
    return PlanInputs(
        model=args.model or cfg.model.path, nodes=args.nodes, gpus_per_node=args.gpus_per_node, dtype=dtype,
        quantization=quant, lora_targets=targets, sharing=cfg.sharing, adapter_ranks=ranks,
        active_adapters=2 if cfg.sharing == "hybrid" else 1, lora_dropout=cfg.lora.dropout,
        micro_batch_size=args.micro_batch_size or cfg.micro_batch_size, seq_len=args.seq_len or cfg.max_seq_len,
        gradient_checkpointing=(cfg.model.gradient_checkpointing if args.gradient_checkpointing is None
                                else args.gradient_checkpointing),
        attn_implementation=attn, task_gradient_copies=cfg.sampling.tasks_per_step if surgery else 0,
        gpu_memory_gib=args.gpu_memory, **zero)


def _deepspeed_settings(cfg: RunConfig, world: int, hidden: int, lora_sizes: list[int],
                        frozen_sizes: list[int]) -> dict:
    """PlanInputs' DeepSpeed fields from the run config's DeepSpeed JSON ("auto" filled as the trainer
    fills it; a key left out takes DeepSpeed's default, runtime/zero/config.py)."""
    from mtl_scale.ds_config import build_ds_config, resolve_path, zero_stage
    ds = build_ds_config(cfg, world, hidden, lora_sizes, frozen_sizes)
    zero = ds.get("zero_optimization", {})

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    def dtype(key: str, value) -> str | None:
        if value is None:
            return None
        if str(value).lower() not in DS_DTYPES:
            raise UserError(f"{resolve_path(cfg.deepspeed_config)}: {key}={value!r} is not a dtype DeepSpeed "
                            f"knows; choose one of: {', '.join(DTYPES)}")
        return DS_DTYPES[str(value).lower()]

    return dict(
        zero_stage=zero_stage(ds), offload_optimizer=offloaded("offload_optimizer"),
        offload_params=offloaded("offload_param"),
        reuse_distance=int(zero.get("stage3_max_reuse_distance", 1e9)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 5e7)),
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 1e5)),
        reduce_bucket=int(zero.get("reduce_bucket_size", 5e8)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        # DeepSpeed's default is True for ZeRO-3 only, where it does not change the (single) reduce bucket
        overlap_comm=bool(zero.get("overlap_comm", False)),
        grad_accum_dtype=dtype("data_types.grad_accum_dtype", ds.get("data_types", {}).get("grad_accum_dtype")),
        communication_dtype=dtype("communication_data_type", ds.get("communication_data_type")))


def main(argv: list[str] | None = None) -> Plan:
    args = build_parser().parse_intermixed_args(argv)
    # DeepSpeed's logger writes to the sys.stdout of its import: send it, and anything else printed while
    # planning, to stderr, so that stdout holds only the plan (--json parseable)
    with contextlib.redirect_stdout(sys.stderr):
        shape, inp = inputs_from_args(args)
        result = plan(shape, inp)
    print(json.dumps(to_json(result), indent=2) if args.json else render(result))
    return result
