"""Base model loading, and where the embedded tiny default lives (built by mtl_scale.base_model).

Every model, the embedded default included, is loaded by ``AutoModelForCausalLM.from_pretrained``
from a directory or hub id. Under ZeRO-3 the caller keeps an ``HfDeepSpeedConfig`` alive before
calling :func:`load_model`, so transformers builds the model partitioned (``zero.Init``) and a 70B
checkpoint never materialises whole on one rank.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mtl_scale import attention
from mtl_scale.config import TINY_MODEL, ModelConfig
from mtl_scale.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("MTL_SCALE_CACHE", Path.home() / ".cache" / "mtl_scale"))


def tiny_model_dir() -> Path:
    """The committed checkpoint of the embedded default (mtl_scale/assets/tiny-llama-v<version>)."""
    from mtl_scale.base_model import ASSETS, model_name
    return ASSETS / model_name()


def resolve_model_path(path: str) -> str:
    """The directory or hub id to hand to ``from_pretrained`` (the committed one for the tiny default)."""
    if path == TINY_MODEL:
        return str(ensure_tiny_model())
    if path.startswith("builtin:"):
        raise UserError(f"model.path={path!r}: unknown built-in model; the only one is {TINY_MODEL!r}")
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model.path={path!r} is a directory without config.json; "
                            "point it at a Hugging Face checkpoint directory (config.json + weights)")
        return str(p)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise UserError(f"model.path={path!r} does not exist; give a local checkpoint directory, "
                        f"a hub id such as meta-llama/Llama-3.1-8B, or {TINY_MODEL!r}")
    return path  # a hub id: from_pretrained downloads it (or finds it in the HF cache)


def resolve_device_map(device_map: str | None = "auto") -> str | None:
    """Where one-process tools (evaluate, merge) put the base: ``auto`` spreads it over every visible
    GPU with accelerate (a 70B base fits no single GPU) and means one plain CPU model without CUDA;
    ``none`` (or None) loads it unplaced; anything else goes to ``from_pretrained`` as is."""
    if device_map in (None, "none"):
        return None
    if device_map == "auto" and not torch.cuda.is_available():
        return None
    return device_map


def base_model_record(path: str, resolved: str) -> dict:
    """What a run records about its base: the configured path, the directory loaded, and for the
    embedded default its versioned name and weights checksum."""
    record = {"path": path, "resolved": resolved}
    if path == TINY_MODEL:
        from mtl_scale.base_model import RECIPE_SHA256, model_name
        record.update(name=model_name(), sha256=RECIPE_SHA256)
    return record


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from model.path={path!r}: {e}") from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is customary.
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, path: str):
    """``from_pretrained`` with the configured dtype and attention; under ZeRO-3 (an
    ``HfDeepSpeedConfig`` alive) this builds the model already partitioned."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config from model.path={path!r}: {e}") from None
    if cfg.attn_implementation == "flash_attention_2":
        _check_flash_attention(cfg)
    if cfg.attn_implementation == attention.NAME:
        attention.check_model(hf_config)
        attention.register()
    extra = {}
    if cfg.quantization != "none":
        extra["quantization_config"] = quantization_config(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=hf_config, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code, **extra)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise UserError(f"model.path={path!r} is a {type(hf_config).__name__}, not a causal language "
                            "model (AutoModelForCausalLM cannot load it)") from None
        raise
    if cfg.quantization != "none":
        keep_4bit_layout(model)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: give checkpointed blocks a grad path
    return model


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights in place on CPUs with AVX512-BF16.

    In eval mode without grad, ``Linear4bit.forward`` on such a CPU swaps ``weight.data`` for a
    CPU-packed layout (a uint8 tensor of another shape). Under ZeRO-3 that weight is a gathered
    partition: the swap corrupts it, and every later forward (training included) computes garbage.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _check_flash_attention(cfg: ModelConfig) -> None:
    """Fail before the process group and the model exist, with what to do instead."""
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("model.attn_implementation=flash_attention_2 needs the flash-attn package on a CUDA GPU "
                        "(pip install flash-attn --no-build-isolation); or use sdpa, which runs PyTorch's own "
                        "flash kernels on GPUs")
    if cfg.dtype == "fp32":
        raise UserError("model.attn_implementation=flash_attention_2 computes in bf16 or fp16; set model.dtype=bf16")


def quantization_config(cfg: ModelConfig):
    """bitsandbytes 4-bit config for QLoRA, with the rules that keep it shardable checked up front.

    The 4-bit weights are packed into tensors of ``bnb_4bit_quant_storage``; ZeRO-3 flattens and
    shards parameters of one dtype, so storage = compute dtype = the model dtype. transformers loads
    quantized weights without zero.Init (each rank briefly holds the whole 4-bit model) and
    ``deepspeed.initialize`` then partitions them.
    """
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"model.quantization={cfg.quantization} needs bitsandbytes: pip install -e .[qlora]") from None
    if cfg.dtype == "fp16" and not torch.cuda.is_available():
        raise UserError("model.quantization with model.dtype=fp16 needs a GPU; on CPU use fp32 (or bf16)")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                              bnb_4bit_compute_dtype=DTYPES[cfg.dtype], bnb_4bit_quant_storage=DTYPES[cfg.dtype],
                              bnb_4bit_use_double_quant=True)


# ---------------------------------------------------------------------------------------------
# The embedded tiny default


def ensure_tiny_model() -> Path:
    """The embedded default's directory, after checking that its weights are the committed ones.

    The weights ship with the package (built once by ``python -m mtl_scale.base_model``), so every
    machine loads the same model and nothing is built at run time."""
    from mtl_scale.base_model import RECIPE_SHA256, model_name, sha256
    out = tiny_model_dir()
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{TINY_MODEL} ({model_name()}): {weights} is missing; it ships with mtl_scale "
                        "(reinstall, or rebuild it with python -m mtl_scale.base_model)")
    digest = sha256(weights)
    if digest != RECIPE_SHA256:
        raise UserError(f"{TINY_MODEL} ({model_name()}): {weights} has sha256 {digest}, not the committed "
                        f"{RECIPE_SHA256}; restore it (git checkout) or rebuild with python -m mtl_scale.base_model")
    return out


if __name__ == "__main__":
    print(ensure_tiny_model())
