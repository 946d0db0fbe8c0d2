"""QLoRA on CPU (bitsandbytes 0.50's 4-bit CPU path): the base loads as Linear4bit with storage in the
compute dtype, ZeRO-3 on 2 ranks shards and trains it, and the saved adapter reproduces the trained
model's logits on a freshly quantized base with stock PEFT."""
import pytest
import torch

from dist import launch
from mtl_scale.config import ModelConfig
from mtl_scale.errors import UserError
from mtl_scale.model import keep_4bit_layout, quantization_config

ARGS = ["configs/demo.yaml", "model.quantization=nf4", "sharing=hard", "max_steps=4", "micro_batch_size=4",
        "sampling.tasks_per_step=2", "eval.every_steps=0", "eval.max_examples=2"] + \
       [f"tasks.{i}.{k}" for i in range(4) for k in ("num_examples=40", "eval_size=2")]


@pytest.mark.dist
def test_qlora_nf4_trains_under_zero3_and_adapter_round_trips(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = launch("tests/scripts/train_probe.py", [*ARGS, f"output_dir={tmp_path}"])
    assert "base quantized: 14 Linear4bit layers (nf4, storage fp32)" in res.stdout
    assert "ZeRO stage 3" in res.stdout
    probe = torch.load(tmp_path / "probe_logits.pt", weights_only=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                quantization_config=quantization_config(ModelConfig(quantization="nf4")))
    keep_4bit_layout(base)  # the same kernels as in training: CPU repacking would compute in bf16
    model = PeftModel.from_pretrained(base, tmp_path / "adapters" / "shared").eval()
    with torch.no_grad():
        got = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    mask = probe["attention_mask"].bool()
    torch.testing.assert_close(got[mask], probe["logits"]["shared"][mask], atol=1e-4, rtol=1e-4)


def test_quantization_rules_are_checked_up_front():
    cfg = quantization_config(ModelConfig(quantization="fp4", dtype="fp32"))
    assert cfg.bnb_4bit_quant_type == "fp4" and cfg.bnb_4bit_quant_storage == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="model.quantization with model.dtype=fp16 needs a GPU"):
            quantization_config(ModelConfig(quantization="nf4", dtype="fp16"))


def test_loaded_4bit_layers_keep_their_layout_in_eval(tiny_model_dir):
    from mtl_scale.model import load_model
    model = load_model(ModelConfig(quantization="nf4"), str(tiny_model_dir)).eval()
    layer = model.model.layers[0].self_attn.q_proj
    before = (layer.weight.dtype, layer.weight.shape)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9]]))
    # on an AVX512-BF16 CPU bitsandbytes would otherwise have swapped in a uint8 packed weight
    assert not layer.support_avx512bf16_for_cpu and (layer.weight.dtype, layer.weight.shape) == before
