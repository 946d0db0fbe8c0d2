"""Base model loading, and the bootstrap of the embedded tiny default.

Every model, the embedded default included, is loaded by ``AutoModelForCausalLM.from_pretrained``
from a directory or hub id. Under ZeRO-3 the caller keeps an ``HfDeepSpeedConfig`` alive before
calling :func:`load_model`, so transformers builds the model partitioned (``zero.Init``) and a 70B
checkpoint never materialises whole on one rank.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from mtl_scale.config import TINY_MODEL, ModelConfig
from mtl_scale.data import builtin
from mtl_scale.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Bump when the recipe below changes: it names the cache directory, so old builds are not reused.
TINY_RECIPE = {
    "version": 2,
    "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "pretrain_steps": 1000, "pretrain_batch": 32, "pretrain_seq": 96, "pretrain_lr": 3e-3, "seed": 1234,
}


def cache_dir() -> Path:
    return Path(os.environ.get("MTL_SCALE_CACHE", Path.home() / ".cache" / "mtl_scale"))


def tiny_model_dir() -> Path:
    return cache_dir() / f"tiny-llama-v{TINY_RECIPE['version']}"


def resolve_model_path(path: str) -> str:
    """The directory or hub id to hand to ``from_pretrained``; builds the tiny default if needed."""
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
    """Build the tiny default once (file-locked, so concurrent ranks build it once) and return its
    directory. Cached under $MTL_SCALE_CACHE (default ~/.cache/mtl_scale)."""
    from filelock import FileLock
    out = tiny_model_dir()
    if (out / "DONE").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "DONE").exists():
            build_tiny_model(out)
    return out


def build_tiny_tokenizer():
    """A byte-level tokenizer that splits text into single characters, trained with the
    ``tokenizers`` library on the built-in task text. Single characters keep reverse/sort learnable
    for a tiny model; byte fallback covers any text (real data such as GSM8K)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = builtin.raw_skill_lines(2000, seed=0)
    for name in builtin.GENERATORS:
        corpus += [e["prompt"] + e["completion"] for e in builtin.generate(name, 500, seed=0)]
    trainer = trainers.BpeTrainer(vocab_size=256 + len(specials), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=TINY_RECIPE["max_position_embeddings"])


def build_tiny_model(out: Path) -> None:
    """Random-init a small Llama, pretrain it briefly (full parameters) on raw skill text, and
    save model + tokenizer with ``save_pretrained``. Deterministic: fixed seeds, fixed threads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    r = TINY_RECIPE
    t0 = time.time()
    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=r["hidden_size"], intermediate_size=r["intermediate_size"],
        num_hidden_layers=r["num_hidden_layers"], num_attention_heads=r["num_attention_heads"],
        num_key_value_heads=r["num_key_value_heads"], max_position_embeddings=r["max_position_embeddings"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the same thread count everywhere keeps the float sums identical
    torch.manual_seed(r["seed"])
    model = LlamaForCausalLM(config)
    _pretrain(model, tok, r)
    torch.set_num_threads(threads)

    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "mtl_scale_recipe.json").write_text(json.dumps(r, indent=2))
    (tmp / "DONE").write_text(f"built in {time.time() - t0:.0f}s\n")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a half-built model is never picked up
    log.info("built the tiny default model in %s (%.0fs)", out, time.time() - t0)


def _pretrain(model, tok, r: dict) -> None:
    """Full-parameter next-token training on packed raw skill lines (``cab^abc``, ``12+3=15``...)."""
    gen = torch.Generator().manual_seed(r["seed"])
    lines = builtin.raw_skill_lines(r["pretrain_steps"] * r["pretrain_batch"] * 12, seed=r["seed"])
    ids = []
    for line_ids in tok(lines, add_special_tokens=False)["input_ids"]:
        # each line a document, <s>text</s>, framed as instruction examples are
        ids += [tok.bos_token_id, *line_ids, tok.eos_token_id]
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=r["pretrain_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["pretrain_lr"], total_steps=r["pretrain_steps"],
                                                pct_start=0.05)
    model.train()
    seq = r["pretrain_seq"]
    for step in range(r["pretrain_steps"]):
        starts = torch.randint(0, len(data) - seq - 1, (r["pretrain_batch"],), generator=gen)
        batch = torch.stack([data[s:s + seq] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == r["pretrain_steps"] - 1:
            log.info("tiny-model pretraining step %d/%d loss %.3f", step + 1, r["pretrain_steps"], loss.item())
    model.eval()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_tiny_model())
