"""Model-loading errors a user can cause, raised before any process group or weights exist."""
import importlib.util

import pytest

from mtl_scale.config import ModelConfig
from mtl_scale.errors import UserError
from mtl_scale.model import load_model


def test_flash_attention_2_without_the_package_says_what_to_do(tiny_model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(UserError, match=r"flash_attention_2 needs the flash-attn package .* or use sdpa"):
        load_model(ModelConfig(attn_implementation="flash_attention_2", dtype="bf16"), str(tiny_model_dir))


def test_flash_attention_2_in_fp32_is_refused(tiny_model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real("torch") if name == "flash_attn" else real(name, *a))
    with pytest.raises(UserError, match="flash_attention_2 computes in bf16 or fp16; set model.dtype=bf16"):
        load_model(ModelConfig(attn_implementation="flash_attention_2", dtype="fp32"), str(tiny_model_dir))


def test_embedded_base_is_the_committed_one(tiny_model_dir):
    import json

    from mtl_scale.base_model import RECIPE, RECIPE_SHA256, model_name, sha256
    assert tiny_model_dir.name == model_name() == f"tiny-llama-v{RECIPE['version']}"
    assert sha256(tiny_model_dir / "model.safetensors") == RECIPE_SHA256
    meta = json.loads((tiny_model_dir / "mtl_scale_recipe.json").read_text())
    assert meta["name"] == model_name() and meta["recipe"] == RECIPE
    assert meta["model_safetensors_sha256"] == RECIPE_SHA256


def test_embedded_base_with_other_weights_is_refused(monkeypatch):
    import mtl_scale.base_model as base_model
    from mtl_scale.model import ensure_tiny_model
    monkeypatch.setattr(base_model, "RECIPE_SHA256", "0" * 64)
    with pytest.raises(UserError, match=r"has sha256 [0-9a-f]{64}, not the committed 0{64}; restore it"):
        ensure_tiny_model()


@pytest.mark.parametrize("text", ["Jürgen Weiß «ß» 12€", "Привет, мир!", "Ελληνικά", "a\tb\n c ~^", "日本語 🙂"])
def test_byte_level_tokenizer_round_trips_any_text(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [b + 3 for b in text.encode("utf-8")]  # one token per UTF-8 byte, after <pad> <s> </s>
    assert tiny_tokenizer.decode(ids) == text
