import torch

from mtl_scale import adapters
from mtl_scale.config import LoraConfig
from mtl_scale.engine import Surgery, apply_surgery
from mtl_scale.model import load_model
from mtl_scale.config import ModelConfig


def test_adapter_parameters_are_selected_by_their_own_segment(tiny_model_dir):
    """Task names that also appear in parameter paths ("mlp", "0") select only their own adapter."""
    model = adapters.attach_adapters(load_model(ModelConfig(), str(tiny_model_dir)),
                                     LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), ["mlp", "0"], seed=0)
    mlp, zero = adapters.lora_parameters(model, "mlp"), adapters.lora_parameters(model, "0")
    assert len(mlp) == len(zero) == 2 * 2 * 2  # layers x modules x (A, B)
    assert all(".lora_A.mlp." in k or ".lora_B.mlp." in k for k in mlp)
    assert all(".lora_A.0." in k or ".lora_B.0." in k for k in zero)
    key = next(iter(mlp))
    assert adapters.rename_adapter_key(key, "mlp", "0") in zero
    assert len(adapters.lora_parameters(model)) == 16


def test_surgery_leaves_a_non_finite_step_to_deepspeed():
    """A NaN task gradient: no weights are computed (MGDA would fail on it) and nothing is written back."""
    shards = [torch.tensor([1.0, 2.0]), torch.tensor([float("nan"), 1.0])]
    stats = apply_surgery(Surgery("mgda", params=[], seed=0), ["a", "b"], shards, step=0)
    assert stats.weights.tolist() == [1.0, 1.0] and stats.projections == 0
    assert not torch.isfinite(stats.gram).all()
