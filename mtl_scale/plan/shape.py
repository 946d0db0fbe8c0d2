"""A model's shape from its config.json: the model is instantiated on the meta device (shapes, no weights,
no memory), so parameter counts and the Linear layers LoRA wraps are exact. What mtl_scale.plan.estimate
estimates memory from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mtl_scale.config import TINY_MODEL
from mtl_scale.errors import UserError

CHECKOUT = Path(__file__).resolve().parents[2]
SHIPPED_MODELS = CHECKOUT / "configs" / "models"


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
