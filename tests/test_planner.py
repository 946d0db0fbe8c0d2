"""The memory planner: exact parameter counts, LoRA counts equal to PEFT's, the activation formula equal
to what autograd saves, hand-computed components, the fit decision, and the CLI's errors.
Fast: no DeepSpeed ranks (the meta device, and a tiny Llama on CPU)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtl_scale.plan import cli as plan_cli, estimate as planner, shape as model_shape
from mtl_scale.ds_config import persistence_threshold
from mtl_scale.engine import Surgery, apply_surgery
from mtl_scale.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
GiB = 2 ** 30


def shape_of(path) -> model_shape.ModelShape:
    cfg, source = model_shape.load_model_config(str(path))
    return model_shape.model_shape(cfg, source)


def inputs(*argv: str):
    return plan_cli.inputs_from_args(plan_cli.build_parser().parse_intermixed_args(list(argv)))


@pytest.mark.parametrize("name,total", [("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496)])
def test_published_parameter_counts(name, total):
    shape = shape_of(ROOT / "configs" / "models" / f"{name}.json")
    assert shape.total_params == total
    assert shape.largest_module == ("model.embed_tokens", 128256 * shape.hidden)


def test_every_shipped_model_config_loads():
    files = sorted((ROOT / "configs" / "models").glob("*.json"))
    assert len(files) >= 2
    for f in files:
        shape = shape_of(f)
        assert shape.architecture == "LlamaForCausalLM" and shape.layers > 0, f


def test_hub_id_falls_back_to_the_shipped_architecture():
    cfg, source = model_shape.load_model_config("meta-llama/Llama-3.1-8B-Instruct")
    assert cfg.hidden_size == 4096 and "configs/models/llama-3.1-8b.json" in source


@pytest.mark.parametrize("sharing,argv", [
    ("hard", ["lora.r=16"]),
    ("soft", ["--adapters", "3", "lora.r=8"]),
    ("hybrid", ["--adapters", "3", "lora.r=16", "hybrid.task_r=4"]),
    ("soft", ["--adapters", "2", "--lora-targets", "all-linear"]),
])
def test_lora_counts_equal_what_peft_creates(tiny_model_dir, sharing, argv):
    from transformers import AutoModelForCausalLM
    from mtl_scale import adapters
    from mtl_scale.config import LoraConfig
    shape, inp = inputs("--model", str(tiny_model_dir), f"sharing={sharing}", *argv)
    k = len(inp.adapter_ranks) - (sharing == "hybrid")
    tasks = [f"t{i}" for i in range(k)]
    lora = LoraConfig(r=inp.adapter_ranks[0], target_modules=inp.lora_targets)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = adapters.attach_adapters(model, lora, adapters.adapter_names(sharing, tasks), seed=0,
                                     task_r=inp.adapter_ranks[-1] if sharing == "hybrid" else None)
    peft_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(model_shape.lora_param_counts(shape, inp.lora_targets, inp.adapter_ranks)) == peft_count


def _autograd_saved_bytes(layers: int, dtype, attn: str, dropout: float = 0.0, checkpointing: bool = False,
                          zero3: bool = False, b: int = 3, s: int = 40) -> int:
    """Bytes of distinct non-parameter storages autograd saves in one forward of a PEFT Llama.
    zero3: as in a run built under zero.Init: fp32 adapters kept on a bf16 base, and
    torch.nn.functional.linear replaced by DeepSpeed's zero3_linear_wrap. sdpa_varlen: packed rows (two
    examples each, position ids restarting, no mask), the path it exists for."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM
    from mtl_scale import attention
    attention.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=352, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn, use_cache=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = peft.LoraConfig(r=8, lora_dropout=dropout, target_modules=list(planner.ROLE_INPUT))
    model = peft.get_peft_model(model, lora, autocast_adapter_dtype=zero3)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    linear = torch.nn.functional.linear
    if zero3:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap
        torch.nn.functional.linear = zero3_linear_wrap
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ids = torch.randint(0, 300, (b, s))
            if attn == attention.NAME:
                positions = torch.cat([torch.arange(s // 3), torch.arange(s - s // 3)]).expand(b, -1)
                model.base_model.model.model(input_ids=ids, position_ids=positions)
            else:
                model.base_model.model.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        torch.nn.functional.linear = linear
    return sum(saved.values())


def _gqa_shape() -> model_shape.ModelShape:
    """The shape _autograd_saved_bytes builds: hidden 128, 4 heads, 2 KV heads of 32."""
    linears = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (128, 64), "self_attn.v_proj": (128, 64),
               "self_attn.o_proj": (128, 128), "mlp.gate_proj": (128, 352), "mlp.up_proj": (128, 352),
               "mlp.down_proj": (352, 128)}
    return model_shape.ModelShape("test", "LlamaForCausalLM", 0, 300, 128, 352, 2, 4, 2, 32,
                                  {f"model.layers.0.{n}": io for n, io in linears.items()}, "lm_head", ("x", 1), {})


def test_sdpa_varlen_on_a_gpu_plans_what_the_varlen_kernel_saves(monkeypatch):
    """On a GPU in bf16 sdpa_varlen runs torch's flash varlen kernel (mtl_scale/attention.py): sdpa's saved
    tensors, plus the KV heads repeated (2 x (128 - 64) more per token and layer, in 2 bytes) where the
    installed torch's varlen_attn takes no enable_gqa; elsewhere the loop's per-example outputs (128 x 2)."""
    from mtl_scale import attention
    shape = _gqa_shape()

    def layer(attn, device):
        inp = planner.PlanInputs(model="test", dtype="bf16", attn_implementation=attn, adapter_ranks=[8],
                                 padded=False, seq_len=40, device=device, zero_stage=2)
        targets = model_shape.lora_targets(shape, inp.lora_targets)
        return planner.activation_bytes_per_token(shape, inp, targets)["layer"]
    assert layer("sdpa_varlen", "cpu") - layer("sdpa", "cpu") == 2 * 128
    gqa = attention.VarlenKernel(None, {"window_size": (-1, 0)}, True)  # torch 2.13's
    monkeypatch.setattr(attention, "torch_varlen", lambda: gqa)
    assert layer("sdpa_varlen", "cuda") == layer("sdpa", "cuda")
    no_gqa = attention.VarlenKernel(None, {"window_size": (-1, 0)}, False)
    monkeypatch.setattr(attention, "torch_varlen", lambda: no_gqa)
    assert layer("sdpa_varlen", "cuda") - layer("sdpa", "cuda") == 2 * 2 * (128 - 64)
    monkeypatch.setattr(attention, "torch_varlen", lambda: None)  # a torch without the kernel: the loop
    assert layer("sdpa_varlen", "cuda") - layer("sdpa", "cuda") == 2 * 128


@pytest.mark.parametrize("dtype,attn,dropout,checkpointing,zero3", [
    (torch.float32, "sdpa", 0.0, False, False), (torch.bfloat16, "sdpa", 0.0, False, False),
    (torch.float32, "eager", 0.0, False, False), (torch.bfloat16, "eager", 0.0, False, False),
    (torch.float32, "sdpa", 0.1, False, False), (torch.bfloat16, "sdpa", 0.0, True, False),
    (torch.bfloat16, "sdpa", 0.0, False, True), (torch.bfloat16, "sdpa", 0.1, False, True),
    (torch.bfloat16, "eager", 0.0, False, True), (torch.float32, "sdpa", 0.0, False, True),
    (torch.float32, "sdpa_varlen", 0.0, False, False), (torch.bfloat16, "sdpa_varlen", 0.0, False, True),
])
def test_activation_formula_equals_what_autograd_saves_per_layer(dtype, attn, dropout, checkpointing, zero3):
    """One more decoder layer adds exactly the formula's bytes (CPU, so dropout masks are in dtype);
    zero3 plans ZeRO-3 (built under zero.Init), the rest ZeRO-2."""
    b, s = 3, 40
    args = (dtype, attn, dropout, checkpointing, zero3)
    measured = _autograd_saved_bytes(3, *args) - _autograd_saved_bytes(2, *args)
    shape = _gqa_shape()
    inp = planner.PlanInputs(model="test", dtype="fp32" if dtype == torch.float32 else "bf16", attn_implementation=attn,
                             lora_dropout=dropout, adapter_ranks=[8], padded=False, seq_len=s, device="cpu",
                             zero_stage=3 if zero3 else 2)
    act = planner.activation_bytes_per_token(shape, inp, model_shape.lora_targets(shape, inp.lora_targets))
    assert measured == b * s * (act["checkpoint"] if checkpointing else act["layer"])


def test_hand_computed_components_for_the_tiny_model(tiny_model_dir):
    """Tiny Llama (tiny-llama-v4): V=259, h=128, i=384, 2 layers, 4 heads, 4 KV heads of 32; fp32, r=16 on all 7
    projections, 2 GPUs. ZeRO-3 keeps parameters of at most the "auto" persistence threshold whole: the largest
    LoRA matrix, 16 x 384 = 6144 elements (below k_proj's 128 x 128 = 16384), so the norms and every LoRA matrix."""
    shape = shape_of(tiny_model_dir)
    h, i, kv, V, L = 128, 384, 128, 259, 2
    total = 2 * V * h + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    assert shape.total_params == total
    lora = 16 * L * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    inp = planner.PlanInputs(model="tiny", nodes=1, gpus_per_node=2, zero_stage=3, dtype="fp32", adapter_ranks=[16],
                             micro_batch_size=4, seq_len=64, padded=False, device="cpu", prefetch_bucket=1000)
    plan = planner.estimate(shape, inp)
    c = {x.name: x for x in plan.components}
    assert c["frozen base parameters"].bytes == total * 4 // 2 + (2 * L + 1) * h * 4  # / W, + the norms whole
    assert planner.persistence(shape, inp) == 16 * i
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    # lm_head + both layers' bases (the adapters are whole anyway) + the embedding (its output requires grad:
    # back in backward) + bucket
    assert c["ZeRO-3 gathered working set"].bytes == (V * h + L * layer + V * h + 1000) * 4
    far = planner.estimate(shape, dataclasses.replace(inp, reuse_distance=2 * V * h + layer)).components
    assert {x.name: x.bytes for x in far}["ZeRO-3 gathered working set"] == \
        (V * h + layer + 1000) * 4  # only the last layer comes back soon enough
    assert c["LoRA parameters"].bytes == lora * 4 // 2 + lora * 4  # ZeRO-3's partition, and the whole
    # With HF's 10 h = 1280 instead, no LoRA matrix stays whole (the smallest, r x h = 2048, is above it): a
    # leaf gathers every one of them with its base weight.
    hf = {x.name: x.bytes for x in planner.estimate(shape, dataclasses.replace(inp, persistence_threshold=10 * h)).components}
    assert hf["LoRA parameters"] == lora * 4 // 2
    assert hf["ZeRO-3 gathered working set"] == (V * h + L * (layer + lora // L) + V * h + 1000) * 4
    assert c["LoRA gradients"].bytes == lora * 4 // 2
    assert c["optimizer states"].bytes == lora * 12 // 2
    assert c["gradient reduce bucket"].bytes == h * h * 4  # reduce_bucket_size h^2 in fp32 (communication_data_type)
    per_layer = 2 * (4 * h + 4) + 4 * (2 * h + 2 * kv) + 4 * 4 + 3 * 4 * i + 4 * (h + h + i) + 4 * 7 * 16
    # + once: the final norm's fp32 input, and lm_head's input (DeepSpeed's zero3_linear_wrap saves it)
    assert c["activations"].bytes == 4 * 64 * (L * per_layer + 4 * h + 4 + 4 * h)
    assert c["logits"].bytes == 4 * 64 * V * 4
    assert c["backward working memory"].bytes == 4 * 64 * max(12 * V, 8 * i)
    assert "CUDA context + NCCL" not in c and "task gradient shards" not in c  # device=cpu; no surgery
    assert plan.peak == plan.gpu_total == sum(x.bytes for x in c.values())

    z2 = {x.name: x.bytes for x in planner.estimate(shape, dataclasses.replace(inp, zero_stage=2)).components}
    assert z2["frozen base parameters"] == total * 4                      # ZeRO-2: whole on every GPU
    assert z2["LoRA gradients"] == lora * 4 // 2 and z2["LoRA parameters"] == lora * 4
    assert z2["optimizer states"] == lora * 12 // 2
    assert "ZeRO-3 gathered working set" not in z2
    bf16_overlap = dataclasses.replace(inp, zero_stage=2, overlap_comm=True, grad_accum_dtype=None, dtype="bf16")
    z2_overlap = {x.name: x.bytes for x in planner.estimate(shape, bf16_overlap).components}
    assert z2_overlap["gradient reduce bucket"] == 2 * h * h * 2        # two buckets in the bf16 gradients' dtype
    assert z2_overlap["LoRA gradients"] == lora * 2 // 2                # accumulated in bf16
    z1 = {x.name: x.bytes for x in planner.estimate(shape, dataclasses.replace(inp, zero_stage=1)).components}
    assert z1["LoRA gradients"] == lora * 4 and z1["optimizer states"] == lora * 12 // 2  # ZeRO-1: gradients whole
    z0 = {x.name: x.bytes for x in planner.estimate(shape, dataclasses.replace(inp, zero_stage=0)).components}
    assert z0["optimizer states"] == lora * 8 and "gradient reduce bucket" not in z0  # fp32 without ZeRO: Adam m, v

    off = planner.estimate(shape, dataclasses.replace(inp, offload_optimizer=True))
    moved = {x.name: x for x in off.components if x.device == "cpu"}
    assert set(moved) == {"LoRA gradients", "optimizer states"}
    assert off.gpu_total == plan.gpu_total - lora * 16 // 2
    off_params = planner.estimate(shape, dataclasses.replace(inp, offload_optimizer=True, offload_params=True))
    assert off_params.cpu_total == off.cpu_total + c["frozen base parameters"].bytes + c["LoRA parameters"].bytes

    gc_plan = planner.estimate(shape, dataclasses.replace(inp, gradient_checkpointing=True))
    gc = {x.name: x.bytes for x in gc_plan.components}
    assert gc["activations"] == 4 * 64 * (L * 4 * h + 4 * h + 4 + 4 * h)  # each layer's input + the once terms
    assert gc["backward working memory"] == 4 * 64 * max(12 * V, per_layer + 8 * i)
    assert gc["ZeRO-3 gathered working set"] == c["ZeRO-3 gathered working set"].bytes

    soft = planner.estimate(shape, dataclasses.replace(inp, sharing="soft", adapter_ranks=[16] * 3)).components
    soft = {x.name: x.bytes for x in soft}
    # the same module trace whichever adapter is active: soft keeps what hard does; all 3 adapters whole
    assert soft["ZeRO-3 gathered working set"] == c["ZeRO-3 gathered working set"].bytes
    assert soft["LoRA parameters"] == 3 * (lora * 4 // 2 + lora * 4)  # K adapters: K times the parameters
    assert soft["optimizer states"] == 3 * lora * 12 // 2


def test_task_gradient_shards_of_surgery(tiny_model_dir):
    """PCGrad over K = 4 task groups on the hard adapter: K - 1 fp32 shard copies through the last backward,
    then apply_surgery's 16 B per shard element and task once the activations are freed."""
    shape = shape_of(tiny_model_dir)
    h, i, kv, L = 128, 384, 128, 2
    lora = 16 * L * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    inp = planner.PlanInputs(model="tiny", gpus_per_node=2, dtype="fp32", micro_batch_size=1, seq_len=8,
                             padded=False, device="cpu", task_gradient_copies=4)
    result = planner.estimate(shape, inp)
    c = {x.name: x.bytes for x in result.components}
    assert c["task gradient shards"] == 3 * 4 * lora // 2
    assert result.surgery_peak == (result.gpu_total - c["activations"] - c["backward working memory"]
                                   - c["task gradient shards"] + 16 * 4 * lora // 2)
    assert result.peak == max(result.gpu_total, result.surgery_peak)
    soft = planner.estimate(shape, dataclasses.replace(inp, sharing="soft", adapter_ranks=[16] * 4))
    assert soft.surgery_peak == 0 and "task gradient shards" not in {x.name for x in soft.components}  # nothing shared

    _, from_config = inputs("--model", str(tiny_model_dir), "surgery.method=pcgrad", "sharing=hard",
                            "sampling.tasks_per_step=3")
    assert from_config.task_gradient_copies == 3


def test_quantized_base_under_zero3(tiny_model_dir):
    """nf4, fp32 storage, ZeRO-3 on 2 GPUs: packed Linear weights / W, the rest in fp32 / W (norms whole), the
    quantisation state whole; at load each rank holds the whole 4-bit base; adapters in the training dtype."""
    shape = shape_of(tiny_model_dir)
    h, i, kv, V, L = 128, 384, 128, 259, 2
    linear = L * (2 * h * h + 2 * h * kv + 3 * h * i)
    inp = planner.PlanInputs(model="tiny", gpus_per_node=2, dtype="fp32", quantization="nf4", padded=False,
                             device="cpu", micro_batch_size=1, seq_len=8)
    result = planner.estimate(shape, inp)
    c = {x.name: x.bytes for x in result.components}
    packed, qstate = planner.quantized_bytes(shape, 4)
    assert packed == linear // 2 + (2 * V * h + (2 * L + 1) * h) * 4
    assert c["frozen base parameters"] == linear // 2 // 2 + 2 * V * h * 4 // 2 + (2 * L + 1) * h * 4 * 3 // 2
    assert c["quantisation state"] == qstate
    assert result.load_peak == packed + qstate
    assert not planner.built_under_zero_init(inp) and planner.lora_dtype_bytes(inp) == 4


def test_deepspeed_estimator_beside_ours_on_the_lora_model_states():
    shape = shape_of(ROOT / "configs" / "models" / "llama-3.1-8b.json")
    inp = planner.PlanInputs(model="8b", sharing="soft", adapter_ranks=[16] * 4)
    result = planner.plan(shape, inp)
    n = sum(result.lora_params)
    assert n == 4 * 16 * 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    ours = result.group("LoRA parameters", "LoRA gradients", "optimizer states")
    # 4 (PEFT's fp32 adapters, kept by ZeRO-3) + 4 + 12 B per parameter / W, + every LoRA matrix whole: the "auto"
    # persistence threshold is the largest, 16 x 14336 (the smallest frozen weight, k_proj, has 4096 x 1024)
    assert planner.persistence(shape, inp) == 16 * 14336
    assert ours == 20 * n // 8 + 4 * n
    ds = result.deepspeed_estimate
    assert ds["estimator"] == "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
    assert ds["lora_gpu_bytes"] == int(18 * n / 8) + 4 * 16 * 14336  # + 4 B x the largest LoRA matrix (16 x 14336)
    # why it cannot apply to the base: 18 B per parameter, as if all were trained
    assert ds["full_finetune_gpu_bytes"] == int(18 * 8_030_261_248 / 8) + 4 * 128256 * 4096
    z2 = planner.plan(shape, dataclasses.replace(inp, zero_stage=2, offload_optimizer=True)).deepspeed_estimate
    assert z2["lora_gpu_bytes"] == 2 * n  # ZeRO-2 with offload: the 16-bit parameters only
    # lm_head (525M elements) alone comes back beyond stage3_max_reuse_distance x 1/2: no layer stays gathered
    assert planner.zero3_kept_gathered(shape, dataclasses.replace(inp, sharing="hard", adapter_ranks=[16])) == \
        (128256 * 4096 * 2, 0)


def test_fits_decision_and_largest_micro_batch():
    shape = shape_of(ROOT / "configs" / "models" / "llama-3.1-8b.json")
    inp = planner.PlanInputs(model="8b", micro_batch_size=4, seq_len=2048, gradient_checkpointing=True)
    total = planner.estimate(shape, inp).gpu_total
    assert planner.estimate(shape, dataclasses.replace(inp, gpu_memory_gib=total / GiB + 0.01)).fits
    assert not planner.estimate(shape, dataclasses.replace(inp, gpu_memory_gib=total / GiB - 0.01)).fits
    best = planner.largest_micro_batch(shape, inp)
    assert best > 4
    assert planner.estimate(shape, dataclasses.replace(inp, micro_batch_size=best)).fits
    assert not planner.estimate(shape, dataclasses.replace(inp, micro_batch_size=best + 1)).fits

    big = dataclasses.replace(inp, micro_batch_size=64, gradient_checkpointing=False)
    result = planner.plan(shape, big)
    assert not result.fits
    assert any(s.startswith("gradient checkpointing:") for s in result.suggestions)
    assert any("micro_batch_size=" in s for s in result.suggestions)
    assert any(s.startswith("offload the optimizer:") for s in result.suggestions)
    # ZeRO-2 with per-task adapters: offload would be refused (ds_config._check_offload), so it is not offered
    zero2 = planner.plan(shape, dataclasses.replace(big, zero_stage=2, sharing="soft"))
    assert not any(s.startswith("offload the optimizer") for s in zero2.suggestions)
    assert any(s.startswith("offload the optimizer:") for s in
               planner.plan(shape, dataclasses.replace(big, zero_stage=2)).suggestions)


def test_plan_from_the_shipped_8gpu_config_as_json(capsys):
    result = plan_cli.main(["--config", "configs/llama3_8b_8gpu.yaml", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is result.fits is True
    assert out["inputs"]["gradient_checkpointing"] is True and out["inputs"]["adapter_ranks"] == [16] * 4
    assert out["inputs"]["lora_dropout"] == 0.05 and out["inputs"]["zero_stage"] == 3
    assert {c["name"] for c in out["components"]} >= {"frozen base parameters", "activations", "logits"}


@pytest.mark.parametrize("argv,message", [
    (["--model", "/nonexistent/config.json"], "--model /nonexistent/config.json: no such file or directory"),
    (["--offload", "bogus"], "--offload='bogus' is not allowed; choose one of: none, optimizer, optimizer+params"),
    (["--zero-stage", "5"], "--zero-stage=5 is not allowed; choose one of: 0, 1, 2, 3"),
    (["--quantization", "int8"], "--quantization='int8' is not allowed; choose one of: none, nf4, fp4"),
    (["--zero-stage", "2", "--offload", "optimizer+params"], "needs ZeRO stage 3"),
    (["--lora-targets", "qkv"], "qkv matches no Linear layer of LlamaForCausalLM; its Linear layers: down_proj"),
    (["--adapters", "2", "sharing=hard"], "--adapters sets the number of per-task adapters; sharing=hard"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be > 0"),
    (["lora.rank=4"], "unknown key lora.rank"),
    (["--dtype", "fp8"], "--dtype='fp8' is not allowed; choose one of: fp32, bf16, fp16"),
    (["model.attn_implementation=flex_attention"],
     "model.attn_implementation='flex_attention' is not allowed; choose one of: sdpa, sdpa_varlen, eager, flash_attention_2"),
    (["--model", "docs"], "--model docs: a directory without config.json"),
    (["--model", "ds_configs/zero3.json"], "--model ds_configs/zero3.json: not a model config.json"),
    (["--zero-stage", "2", "surgery.method=pcgrad", "sharing=hard"], "surgery.method=pcgrad / surgery.telemetry "
                                                                     "work on ZeRO-3's gradient partitions"),
])
def test_cli_errors_name_the_flag_and_what_is_allowed(argv, message):
    if "--model" not in argv:
        argv = ["--model", "configs/models/llama-3.1-8b.json", *argv]
    with pytest.raises(UserError) as e:
        inputs(*argv)
    assert message in str(e.value)


def test_auto_persistence_threshold_keeps_lora_whole_and_the_base_partitioned():
    assert persistence_threshold(4096) == 40960  # no adapters: Hugging Face's 10 h
    assert persistence_threshold(128, [2048, 6144, 1024], [16384, 8192]) == 6144  # every LoRA matrix
    # a LoRA matrix as large as a frozen weight (rank 64 on lm_head's 259 x 128 here) is not made whole: the
    # threshold would take that weight along; the others still are
    assert persistence_threshold(128, [2048, 259 * 64], [16384, 8192]) == 2048
    assert persistence_threshold(4096, [1024], [16384]) == 40960  # never below 10 h


def test_deepspeed_settings_come_from_the_run_config(tmp_path):
    """Keys left out of the DeepSpeed JSON take DeepSpeed's defaults; a dtype it does not know is refused with
    the file and the key."""
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "data_types": {"grad_accum_dtype": "bfloat16"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    _, inp = inputs("--model", "configs/models/llama-3.1-8b.json", f"deepspeed_config={path}")
    assert (inp.zero_stage, inp.persistence_threshold, inp.grad_accum_dtype, inp.communication_dtype) == \
        (3, 0, "bf16", None)
    assert (inp.prefetch_bucket, inp.reduce_bucket, inp.reuse_distance) == (5 * 10 ** 7, 5 * 10 ** 8, 10 ** 9)
    _, shipped = inputs("--model", "configs/models/llama-3.1-8b.json")  # ds_configs/zero3.json, "auto" filled
    # the persistence threshold: 10 h raised to the largest LoRA matrix (down_proj's lora_A, r x 14336)
    assert (shipped.prefetch_bucket, shipped.reduce_bucket, shipped.persistence_threshold) == \
        (int(0.9 * 4096 ** 2), 4096 ** 2, 16 * 14336)
    assert (shipped.grad_accum_dtype, shipped.communication_dtype) == ("fp32", "fp32")

    ds["data_types"]["grad_accum_dtype"] = "fp64"
    path.write_text(json.dumps(ds))
    with pytest.raises(UserError) as e:
        inputs("--model", "configs/models/llama-3.1-8b.json", f"deepspeed_config={path}")
    assert f"{path}: data_types.grad_accum_dtype='fp64' is not a dtype DeepSpeed knows; choose one of: fp32" in \
        str(e.value)


def test_cli_exit_code_and_unresolvable_hub_id():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "launch/plan.py", "--model", "no-such-org/no-such-model"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert "mtl_scale: error: --model no-such-org/no-such-model: cannot resolve this hub id" in res.stderr
    assert "configs/models/llama-3.1-8b.json" in res.stderr


def test_cli_json_is_all_that_goes_to_stdout():
    """DeepSpeed's logger writes to stdout; --json must stay parseable."""
    res = subprocess.run([sys.executable, "launch/plan.py", "--model", "configs/models/llama-3.1-8b.json", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["deepspeed_estimate"]["estimator"].endswith("estimate_zero3_model_states_mem_needs")
    assert out["peak_bytes"] == out["gpu_total_bytes"] and out["fits"] is True


def test_quantized_base_bytes_equal_bitsandbytes(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_quant_storage=torch.float32, bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=q, dtype=torch.float32)
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 0
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            qs = m.weight.quant_state
            state += sum(t.numel() * t.element_size() for t in (qs.absmax, qs.code, qs.state2.absmax, qs.state2.code))
    packed, qstate = planner.quantized_bytes(shape_of(tiny_model_dir), 4)
    assert (packed, qstate) == (stored, state)


def test_surgery_bytes_are_what_apply_surgery_holds():
    """planner.SURGERY_BYTES, measured: the peak of live tensors in apply_surgery (PCGrad, K = 4), plus the
    caller's K running sums it is given, per shard element and task."""
    from bench.common import LiveTensorBytes
    k, n = 4, 250_000
    running = [torch.randn(n) for _ in range(k)]
    with LiveTensorBytes() as live:
        stats = apply_surgery(Surgery("pcgrad", params=[], seed=0), list("abcd"), running, step=0)
    assert stats.gram.shape == (k, k)
    assert (live.peak + k * n * 4) / (k * n) == pytest.approx(planner.SURGERY_BYTES, abs=0.05)
