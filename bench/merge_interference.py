"""Why a merge of task adapters loses a task: how strongly the other tasks' updates act on its inputs.

For each task i and each LoRA'd module, on task i's held-out examples (the base model's input activations h
of that module), the interference ratio

    ||h (sum_{j != i} dW_j)^T|| / ||h dW_i^T||,      dW = (alpha / r) B A

A merge with weights 1 hands task i its own update plus the others' acting on its inputs: a ratio well
below 1 leaves its update dominant, a ratio of about sqrt(K - 1) is what K - 1 unrelated updates of the
same size give (their contributions add in quadrature). Printed per task, as the mean over modules, with
that reference.

    python -m bench.merge_interference runs/transfer-mix/soft/seed0 [--examples 30]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch


def interference_ratio(h: torch.Tensor, own: torch.Tensor, others: list[torch.Tensor]) -> float:
    """||h (sum others)^T|| / ||h own^T|| for activations h (tokens x in) and updates (out x in)."""
    return float((h @ sum(others).T).norm() / (h @ own.T).norm())


def adapter_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Module name (as in the base model) -> (alpha / r) B A of one saved PEFT LoRA adapter."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"):
            scale * weights[key.replace("lora_A", "lora_B")].float() @ a.float()
            for key, a in weights.items() if key.endswith("lora_A.weight")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished soft (or hybrid: its task adapters) run directory")
    parser.add_argument("--examples", type=int, default=30, help="held-out examples per task")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from mtl_scale.config import load_config
    from mtl_scale.data.prepare import prepare_tasks
    from mtl_scale.model import DTYPES, load_tokenizer, resolve_model_path

    cfg = load_config(args.run / "config.yaml")
    path = resolve_model_path(cfg.model.path)
    tasks = prepare_tasks(cfg, load_tokenizer(path, cfg.model.trust_remote_code))
    deltas = {t: adapter_deltas(args.run / "adapters" / t) for t in tasks}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.model.dtype],
                                                 trust_remote_code=cfg.model.trust_remote_code).eval()
    modules = dict(model.named_modules())
    names = list(next(iter(deltas.values())))
    inputs: dict[str, list[torch.Tensor]] = {}
    for n in names:
        modules[n].register_forward_hook(lambda m, inp, out, n=n: inputs[n].append(inp[0].reshape(-1, inp[0].shape[-1])))
    ratios = {}
    for t, data in tasks.items():
        inputs.update({n: [] for n in names})
        with torch.no_grad():
            for ids in data.held_out.input_ids[:args.examples]:
                model(input_ids=torch.tensor([ids]))
        ratios[t] = statistics.fmean(
            interference_ratio(torch.cat(inputs[n]).float(), deltas[t][n], [deltas[o][n] for o in tasks if o != t])
            for n in names)
    print(f"{args.run}: interference ratio per task (mean over {len(names)} modules, {args.examples} held-out "
          f"examples each; sqrt(K-1) = {math.sqrt(len(tasks) - 1):.2f} for unrelated updates)")
    for t, r in ratios.items():
        print(f"  {t:16s} {r:.2f}")
    print(f"  {'mean':16s} {statistics.fmean(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
