"""Held-out evaluation: per-task loss and greedy-generation exact match, for the base model and
for trained adapters loaded from disk with stock PEFT (so it also proves the saved adapters work).

One process, plain transformers + PEFT (no DeepSpeed): pass ``device_map=auto`` on a GPU box to
spread a large base over its GPUs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mtl_scale import adapters as adapters_mod
from mtl_scale.config import RunConfig
from mtl_scale.data.formatting import Encoded, collate, token_loss_sum
from mtl_scale.data.prepare import data_summary, prepare_tasks
from mtl_scale.errors import UserError
from mtl_scale.model import DTYPES, resolve_model_path, load_tokenizer

@torch.no_grad()
def loss_sums(model, data: Encoded, pad_id: int, batch_size: int, device=None) -> tuple[float, int]:
    """Summed completion-token NLL over the examples, and the token count."""
    total, count = 0.0, 0
    device = device or next(model.parameters()).device
    for i in range(0, len(data), batch_size):
        batch = collate(list(zip(data.input_ids[i:i + batch_size], data.labels[i:i + batch_size])), pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        s, n = token_loss_sum(logits, batch["labels"].to(device))
        total, count = total + float(s), count + int(n)
    return total, count


def task_loss(model, data: Encoded, pad_id: int, batch_size: int) -> float:
    """Mean completion-token NLL over the examples (token-weighted)."""
    total, count = loss_sums(model, data, pad_id, batch_size)
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, tokenizer, data: Encoded, batch_size: int, max_new_tokens: int, device=None,
                synced_gpus: bool = False) -> tuple[float, list[str]]:
    """Fraction of examples whose greedy continuation of the prompt equals the reference
    (both stripped of surrounding whitespace), and the generated texts.

    ``synced_gpus``: under ZeRO-3 every rank must keep running forward passes until all are done.
    """
    device = device or next(model.parameters()).device
    outputs: list[str] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(data), batch_size):
        prompts = [ids[:p] for ids, p in zip(data.input_ids[i:i + batch_size], data.prompt_lens[i:i + batch_size])]
        refs = data.references[i:i + batch_size]
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at the same position, where generation starts.
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for j, p in enumerate(prompts):
            input_ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        ref_len = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
        gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=min(max_new_tokens, ref_len + 2), pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus)
        outputs += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return count_hits(outputs, data.references) / max(len(outputs), 1), outputs


def count_hits(outputs: list[str], references: list[str]) -> int:
    """How many generations equal their reference, both stripped of surrounding whitespace."""
    return sum(o.strip() == r.strip() for o, r in zip(outputs, references))


@torch.no_grad()
def evaluate_during_training(model, tokenizer, tasks, eval_cfg, activate, rank: int, world: int) -> dict[str, float]:
    """Held-out loss and exact match per task on the partitioned model, each rank evaluating its own
    shard of the first ``eval.max_examples`` held-out examples; sums are all-reduced.

    Collective: every rank runs the same number of batches (shards are padded with a repeated
    example that is not counted) and ``generate`` runs with ``synced_gpus``.
    """
    from dataclasses import replace

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for name, task in tasks.items():
        data = task.held_out
        n = min(len(data), eval_cfg.max_examples)
        if n == 0:
            continue
        activate(name)
        idx = list(range(rank, n, world))
        per_rank = -(-n // world)
        real = len(idx)
        idx += [0] * (per_rank - real)  # padding: same batch count on every rank
        shard = replace(data, input_ids=[data.input_ids[i] for i in idx],
                        labels=[data.labels[i] if j < real else [-100] * len(data.labels[i]) for j, i in enumerate(idx)],
                        prompt_lens=[data.prompt_lens[i] for i in idx], references=[data.references[i] for i in idx])
        total, count = loss_sums(model, shard, tokenizer.pad_token_id, eval_cfg.batch_size, device)
        _, outputs = exact_match(model, tokenizer, shard, eval_cfg.batch_size, eval_cfg.max_new_tokens, device,
                                 synced_gpus=world > 1)
        hits = count_hits(outputs[:real], shard.references[:real])
        vec = torch.tensor([total, float(count), float(hits), float(real)], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(vec)
        total, count, hits, real = vec.tolist()
        out[f"eval/loss/{name}"] = total / max(count, 1)
        out[f"eval/exact_match/{name}"] = hits / max(real, 1)
    model.train(was_training)
    return out


def evaluate_model(model, tokenizer, tasks, eval_cfg, only: list[str] | None = None) -> dict[str, dict]:
    model.eval()
    out = {}
    for name, task in tasks.items():
        if only is not None and name not in only:
            continue
        data = task.held_out
        if len(data) == 0:
            continue
        em, _ = exact_match(model, tokenizer, data, eval_cfg.batch_size, eval_cfg.max_new_tokens)
        out[name] = {"loss": task_loss(model, data, tokenizer.pad_token_id, eval_cfg.batch_size),
                     "exact_match": em, "n": len(data)}
    return out


def evaluate_run(cfg: RunConfig, adapters_dir: str | None = None, include_base: bool = True,
                 device_map: str | None = None) -> dict:
    """Evaluate the base and each adapter under ``adapters_dir`` (default ``<output_dir>/adapters``):
    a task adapter on its own task, the shared adapter on every task. ``results["data"]`` describes
    the held-out sets evaluated (``data_summary``: examples, drops, duplicates removed)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    tasks = prepare_tasks(cfg, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.model.dtype], device_map=device_map,
                                                trust_remote_code=cfg.model.trust_remote_code)
    if device_map is None and torch.cuda.is_available():
        base = base.cuda()
    results: dict = {"model": model_path, "tasks": list(tasks), "data": data_summary(tasks), "base": {},
                     "adapters": {}}
    if include_base:
        results["base"] = evaluate_model(base, tokenizer, tasks, cfg.eval)
    root = Path(adapters_dir or Path(cfg.output_dir) / "adapters")
    names = adapters_mod.adapter_names(cfg.sharing, list(tasks))
    missing = [n for n in names if not (root / n / "adapter_config.json").is_file()]
    if missing:
        raise UserError(f"no trained adapter {missing[0]!r} under {root} (expected {', '.join(names)}); "
                        "train first, or point --adapters at a run's adapters/ directory")
    model = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(root / name), adapter_name=name)
    if cfg.sharing == "hard":
        results["adapters"][adapters_mod.SHARED] = evaluate_model(model, tokenizer, tasks, cfg.eval)
        return results
    for task in tasks:  # soft: the task's adapter; hybrid: shared + the task's adapter, both applied
        combo = adapters_mod.adapters_for_task(cfg.sharing, task)
        model.base_model.set_adapter(combo)
        results["adapters"]["+".join(combo)] = evaluate_model(model, tokenizer, tasks, cfg.eval, only=[task])
    return results


def results_table(results: dict) -> str:
    """Markdown table: one row per task, base vs its adapter."""
    lines = ["| task | adapter | base loss | adapter loss | base exact match | adapter exact match |",
             "|---|---|---:|---:|---:|---:|"]
    for task in results["tasks"]:
        base = results["base"].get(task, {})
        for name, per_task in results["adapters"].items():
            if task not in per_task:
                continue
            a = per_task[task]
            lines.append(f"| {task} | {name} | {_fmt(base.get('loss'))} | {_fmt(a['loss'])} | "
                         f"{_pct(base.get('exact_match'))} | {_pct(a['exact_match'])} |")
    return "\n".join(lines)


def _fmt(x):
    return "-" if x is None else f"{x:.3f}"


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def write_results(results: dict, path: str | Path) -> None:
    """JSON, written to a temporary name and renamed (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.rename(path)
