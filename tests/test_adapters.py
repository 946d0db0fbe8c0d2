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


def test_shared_a_gives_every_task_adapter_one_frozen_a(tiny_model_dir, tmp_path):
    """lora.shared_a: the task adapters' A are one seeded matrix per layer, frozen (only B trains), the same on
    a second build with the seed (every rank), and the adapters save as standard PEFT directories."""
    import pytest
    from peft import PeftModel

    from mtl_scale.config import ConfigError, load_config
    from mtl_scale.merge import load_base

    lora = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], shared_a=True)

    def build():
        return adapters.attach_adapters(load_model(ModelConfig(), str(tiny_model_dir)), lora,
                                        ["shared", "copy", "reverse"], seed=3, task_r=2)
    model = build()
    for name, p in adapters.lora_parameters(model).items():
        assert p.requires_grad == (".lora_B." in name or ".shared." in name), name
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    assert torch.equal(layer.lora_A["copy"].weight, layer.lora_A["reverse"].weight)
    assert layer.lora_A["copy"].weight.abs().sum() > 0  # random, not zero
    assert not torch.equal(layer.lora_B["copy"].weight, layer.lora_A["copy"].weight.T)  # sanity: B is B
    assert torch.equal(build().base_model.model.model.layers[1].mlp.down_proj.lora_A["copy"].weight,
                       layer.lora_A["copy"].weight)
    assert list(adapters.trainable(adapters.lora_parameters(model, "copy"))) == [
        n for n in adapters.lora_parameters(model, "copy") if ".lora_B." in n]

    gen = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():  # give B an update so that the logits check means something
        if ".lora_B." in n:
            p.data = 0.05 * torch.randn(p.shape, generator=gen)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    for name in ("copy", "reverse"):
        adapters.save_adapter(model, name, tmp_path / name, str(tiny_model_dir), is_writer=True)
    loaded = PeftModel.from_pretrained(load_base(str(tiny_model_dir), "fp32"), str(tmp_path / "copy"),
                                       adapter_name="copy").eval()
    loaded.load_adapter(str(tmp_path / "reverse"), adapter_name="reverse")
    model.eval()
    for name in ("copy", "reverse"):
        adapters.activate(model, name)
        loaded.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ConfigError, match=r"lora.shared_a shares A between per-task adapters, and sharing=hard"):
        load_config(None, ["sharing=hard", "lora.shared_a=true", "tasks=[{name: a, source: 'builtin:copy'}]"])
