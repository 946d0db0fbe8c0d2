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
