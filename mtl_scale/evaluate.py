"""Held-out evaluation: per-task loss and the task's metric (mtl_scale/metrics.py: exact match, an
extracted final answer, ROUGE-L, the likeliest option...) on greedy generations, for the base model and
for trained adapters loaded from disk with stock PEFT (so it also proves the saved adapters work).

One process, plain transformers + PEFT (no DeepSpeed); on a CUDA box the base is spread over the
visible GPUs (``device_map="auto"``) unless told otherwise.

Held-out loss never materialises the logits of a whole batch: the decoder runs once for hidden
states, then the output head and an fp32 cross-entropy run on at most ``eval.loss_chunk_tokens``
*completion* positions at a time (prompt positions need no logits). Full fp32 logits of a 32 x 2048
batch over a 128k vocabulary would be 34 GB, and their log-softmax as much again.
"""
from __future__ import annotations

import json
import logging
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mtl_scale import adapters as adapters_mod
from mtl_scale.config import RunConfig, TaskConfig
from mtl_scale.data.formatting import IGNORE, Encoded, collate, drop_overlap, encode_options
from mtl_scale.data.prepare import data_summary, prepare_tasks
from mtl_scale.errors import UserError
from mtl_scale.metrics import exact_match as exact_match_score, resolve, truncate_at_stop
from mtl_scale.model import DTYPES, resolve_device_map, resolve_model_path, load_tokenizer

log = logging.getLogger(__name__)


class ChunkedHead:
    """A causal LM split as ``logits = transform(head(decoder(...).last_hidden_state))``.

    ``transform`` re-applies what the model's own forward does to the head's output, from its config:
    ``logit_scale`` (Cohere: multiplied), ``logits_scaling`` (Granite: divided),
    ``final_logit_softcapping`` (Gemma 2/3: cap * tanh(x / cap)). Calling the decoder and head modules
    directly works for a PeftModel (LoRA layers sit inside them), under accelerate's device map, and
    under ZeRO-3, whose module hooks gather a submodule's partitioned parameters when it is called.
    """

    def __init__(self, decoder, head, config):
        self.decoder, self.head = decoder, head
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.scale = getattr(config, "logit_scale", None)
        self.divisor = getattr(config, "logits_scaling", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def hidden(self, input_ids, attention_mask) -> torch.Tensor:
        # use_cache=False: a KV cache of the whole batch would be kept for nothing
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states (..., H) -> (..., V)."""
        x = self.head(hidden).float()  # fp32 softmax: bf16 logits lose the small probabilities
        if self.scale is not None:
            x = x * self.scale
        if self.divisor is not None:
            x = x / self.divisor
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x


_chunked_heads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def chunked_head(model) -> tuple[ChunkedHead | None, str]:
    """The model split into decoder and output head, or None and why it cannot be (then the loss
    takes the full logits). Decided once per model by comparing, on an 8-token probe that is the same
    on every rank (so every ZeRO-3 rank takes the same path), the split's logits with the model's own:
    a forward that changes logits in a way the config does not say is caught, not trusted."""
    if model not in _chunked_heads:
        split, reason = _split(model)
        if split is None:
            log.warning("held-out loss takes the full logits of each batch (no chunking): %s", reason)
        _chunked_heads[model] = split, reason
    return _chunked_heads[model]


def _split(model) -> tuple[ChunkedHead | None, str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT: the CausalLM
    name = type(inner).__name__
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if decoder is None or decoder is inner or head is None:
        return None, f"{name} has no separate decoder and output head"
    split = ChunkedHead(decoder, head, inner.config)
    ids = torch.arange(8, device=next(model.parameters()).device).unsqueeze(0)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()  # dropout would make the two paths differ
    try:
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        ours = split.logits(split.hidden(ids, mask)).to(full.device)
    except (AttributeError, TypeError) as e:  # e.g. a decoder whose output has no last_hidden_state
        return None, f"calling {name}'s decoder and head alone failed ({e})"
    finally:
        model.train(was_training)
    gap = float((ours - full).abs().max())
    # bf16 rounds the two paths' logits differently; a real quirk (x 0.0625, a softcap) is far larger
    if gap > 1e-2 * float(full.abs().max()) + 1e-4:
        return None, (f"{name}'s forward changes the logits beyond its output head (max difference {gap:.3g} "
                      "on a probe) in a way its config does not declare (handled: logit_scale, logits_scaling, "
                      "final_logit_softcapping)")
    return split, ""


def head_calls(data: Encoded, batch_size: int, chunk_tokens: int) -> list[int]:
    """Per batch of ``data``, how many output-head chunks its completion positions need."""
    out = []
    for i in range(0, len(data), batch_size):
        n = sum(sum(t != IGNORE for t in lab[1:]) for lab in data.labels[i:i + batch_size])
        out.append(math.ceil(n / chunk_tokens))
    return out


@torch.no_grad()
def example_loss_sums(model, data: Encoded, pad_id: int, batch_size: int, device=None, chunk_tokens: int = 0,
                      min_head_calls: list[int] | None = None) -> tuple[list[float], list[int]]:
    """Per example: summed completion-token NLL and the token count.

    ``chunk_tokens`` > 0: hidden states once per batch, then head + fp32 cross-entropy over at most
    that many completion positions at a time (see :func:`chunked_head`; 0: full logits).
    ``min_head_calls``: per batch, call the head at least this often (with empty chunks if need be):
    under ZeRO-3 each call all-gathers the head's weight, so every rank must make as many calls.
    """
    sums: list[float] = []
    counts: list[int] = []
    device = device or next(model.parameters()).device
    split = chunked_head(model)[0] if chunk_tokens > 0 else None
    for b, i in enumerate(range(0, len(data), batch_size)):
        batch = collate(list(zip(data.input_ids[i:i + batch_size], data.labels[i:i + batch_size])), pad_id)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        keep = labels != IGNORE
        rows = torch.arange(len(labels))[:, None].expand_as(labels)[keep]  # (N,): the example of each position
        per = torch.zeros(len(labels), dtype=torch.float64)
        if split is None:
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float()[keep.to(logits.device)],
                                                    labels[keep].to(logits.device), reduction="none")
            per.index_add_(0, rows, nll.double().cpu())
        else:
            hidden = split.hidden(input_ids, mask)[:, :-1][keep.to(input_ids.device)]  # (N, H): completion positions
            targets = labels[keep]
            calls = max(math.ceil(len(targets) / chunk_tokens), min_head_calls[b] if min_head_calls else 0)
            for c in range(calls):
                part = slice(c * chunk_tokens, (c + 1) * chunk_tokens)
                logits = split.logits(hidden[part])  # (<= chunk_tokens, V) fp32
                nll = torch.nn.functional.cross_entropy(logits, targets[part].to(logits.device), reduction="none")
                per.index_add_(0, rows[part], nll.double().cpu())
        sums += per.tolist()
        counts += keep.sum(1).tolist()
    return sums, counts


def loss_sums(model, data: Encoded, pad_id: int, batch_size: int, device=None, chunk_tokens: int = 0,
              min_head_calls: list[int] | None = None) -> tuple[float, int]:
    """Summed completion-token NLL over the examples, and the token count (see :func:`example_loss_sums`)."""
    sums, counts = example_loss_sums(model, data, pad_id, batch_size, device, chunk_tokens, min_head_calls)
    return sum(sums), sum(counts)


@torch.no_grad()
def generate(model, tokenizer, data: Encoded, batch_size: int, max_new_tokens: int, stop: list[str] = (),
             stop_at_reference: bool = False, device=None, synced_gpus: bool = False) -> list[str]:
    """Greedy continuations of the examples' prompts (batched, left-padded, with the KV cache), decoded
    without special tokens and cut at the first stop string.

    ``stop_at_reference``: generate at most the reference's length + 2 tokens (enough for exact match).
    ``synced_gpus``: under ZeRO-3 every rank must keep running forward passes until all are done.
    """
    device = device or next(model.parameters()).device
    outputs: list[str] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(data), batch_size):
        prompts = [ids[:p] for ids, p in zip(data.input_ids[i:i + batch_size], data.prompt_lens[i:i + batch_size])]
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at the same position, where generation starts.
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for j, p in enumerate(prompts):
            input_ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        limit = max_new_tokens
        if stop_at_reference:
            refs = data.references[i:i + batch_size]
            limit = min(limit, max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs) + 2)
        extra = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
        gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=limit, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             synced_gpus=synced_gpus, **extra)
        overlaps = data.overlaps[i:i + batch_size] or [""] * len(prompts)
        outputs += [truncate_at_stop(drop_overlap(o, overlap), list(stop)) for o, overlap in
                    zip(tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True), overlaps)]
    return outputs


def exact_match(model, tokenizer, data: Encoded, batch_size: int, max_new_tokens: int, device=None,
                synced_gpus: bool = False) -> tuple[float, list[str]]:
    """Fraction of examples whose greedy continuation of the prompt equals the reference (both stripped of
    surrounding whitespace), and the generated texts."""
    outputs = generate(model, tokenizer, data, batch_size, max_new_tokens, stop_at_reference=True, device=device,
                       synced_gpus=synced_gpus)
    return sum(map(exact_match_score, outputs, data.references)) / max(len(outputs), 1), outputs


def choose(model, tokenizer, data: Encoded, task: TaskConfig, batch_size: int, device=None, chunk_tokens: int = 0,
           sync: Callable[[list[int]], list[int]] | None = None) -> list[str]:
    """metric=choice: per example, the option of ``task.choices`` with the highest log-likelihood after its
    prompt (summed over the option's tokens, lm-evaluation-harness's ``acc``). ``sync``: makes the per-batch
    output-head call counts equal on every rank (ZeRO-3, see :func:`head_calls`)."""
    nll = []
    for option in task.choices:
        options = encode_options(data.prompt_texts, option, task.format, tokenizer)
        nll.append(example_loss_sums(model, options, tokenizer.pad_token_id, batch_size, device, chunk_tokens,
                                     _synced_head_calls(options, batch_size, chunk_tokens, sync))[0])
    return [task.choices[min(range(len(task.choices)), key=lambda k: nll[k][i])] for i in range(len(data))]


@dataclass
class TaskScores:
    """One task's held-out evaluation: loss sums, and per example the prediction, score and exact match."""
    loss_total: float
    tokens: int
    predictions: list[str]
    scores: list[float]
    exact: list[float]


def score_task(model, tokenizer, data: Encoded, task: TaskConfig, eval_cfg, device=None, world: int = 1) -> TaskScores:
    """Held-out loss, predictions (generations, or the chosen option) and the task's metric on ``data``.
    ``world`` > 1: a collective on every rank of a ZeRO-3 model, each holding a shard padded to the same
    length (the same number of batches and head calls everywhere; generation with ``synced_gpus``)."""
    metric = resolve(task.metric, task.answer_pattern, task.name)
    chunk = eval_cfg.loss_chunk_tokens
    sync = (lambda calls: _max_over_ranks(calls, device)) if world > 1 else None
    calls = _synced_head_calls(data, eval_cfg.batch_size, chunk, sync)
    total, count = loss_sums(model, data, tokenizer.pad_token_id, eval_cfg.batch_size, device, chunk, calls)
    if metric.generates:
        predictions = generate(model, tokenizer, data, eval_cfg.batch_size, task.max_new_tokens or
                               eval_cfg.max_new_tokens, task.stop, metric.stops_at_reference, device,
                               synced_gpus=world > 1)
    else:
        predictions = choose(model, tokenizer, data, task, eval_cfg.batch_size, device, chunk, sync)
    return TaskScores(total, count, predictions, [float(metric.score(p, r)) for p, r in zip(predictions, data.references)],
                      [exact_match_score(p, r) for p, r in zip(predictions, data.references)])


def _synced_head_calls(data: Encoded, batch_size: int, chunk_tokens: int,
                       sync: Callable[[list[int]], list[int]] | None) -> list[int] | None:
    """Per batch, the output-head calls of the chunked loss (None without chunking), made equal over ranks."""
    if chunk_tokens <= 0:
        return None
    calls = head_calls(data, batch_size, chunk_tokens)
    return sync(calls) if sync is not None else calls


def _max_over_ranks(values: list[int], device) -> list[int]:
    """Element-wise maximum over all ranks: one small all-reduce."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [int(c) for c in t.tolist()]


@torch.no_grad()
def evaluate_during_training(model, tokenizer, tasks, eval_cfg, activate, rank: int, world: int) -> dict[str, float]:
    """Held-out loss, the task's metric (``eval/score``) and exact match per task on the partitioned model,
    each rank evaluating its own shard of the first ``eval.max_examples`` held-out examples; sums are
    all-reduced.

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
                        prompt_lens=[data.prompt_lens[i] for i in idx], references=[data.references[i] for i in idx],
                        prompt_texts=[data.prompt_texts[i] for i in idx] if data.prompt_texts else [],
                        overlaps=[data.overlaps[i] for i in idx] if data.overlaps else [])
        r = score_task(model, tokenizer, shard, task.config, eval_cfg, device, world)
        vec = torch.tensor([r.loss_total, float(r.tokens), sum(r.scores[:real]), sum(r.exact[:real]), float(real)],
                           dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(vec)
        total, count, score, hits, real = vec.tolist()
        out[f"eval/loss/{name}"] = total / max(count, 1)
        out[f"eval/score/{name}"] = score / max(real, 1)
        out[f"eval/exact_match/{name}"] = hits / max(real, 1)
    model.train(was_training)
    return out


def evaluate_model(model, tokenizer, tasks, eval_cfg, only: list[str] | None = None) -> dict[str, dict]:
    """Per task: held-out loss, its metric's mean ``score`` (and which ``metric``), exact match, ``n``."""
    model.eval()
    out = {}
    for name, task in tasks.items():
        if only is not None and name not in only:
            continue
        data = task.held_out
        if len(data) == 0:
            continue
        r = score_task(model, tokenizer, data, task.config, eval_cfg)
        out[name] = {"loss": r.loss_total / max(r.tokens, 1), "metric": task.config.metric,
                     "score": sum(r.scores) / len(data), "exact_match": sum(r.exact) / len(data), "n": len(data)}
    return out


def evaluate_run(cfg: RunConfig, adapters_dir: str | None = None, include_base: bool = True,
                 device_map: str | None = "auto") -> dict:
    """Evaluate the base and each adapter under ``adapters_dir`` (default ``<output_dir>/adapters``):
    a task adapter on its own task, the shared adapter on every task. ``results["data"]`` describes
    the held-out sets evaluated (``data_summary``: examples, drops, duplicates removed). ``device_map``: see
    :func:`mtl_scale.model.resolve_device_map` (``none``: the whole base on one GPU, if any)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    tasks = prepare_tasks(cfg, tokenizer)
    device_map = resolve_device_map(device_map)
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
    """Markdown table: one row per task, base vs its adapter, in the task's metric."""
    lines = ["| task | adapter | metric | base loss | adapter loss | base score | adapter score |",
             "|---|---|---|---:|---:|---:|---:|"]
    for task in results["tasks"]:
        base = results["base"].get(task, {})
        for name, per_task in results["adapters"].items():
            if task not in per_task:
                continue
            a = per_task[task]
            lines.append(f"| {task} | {name} | {a['metric']} | {_fmt(base.get('loss'))} | {_fmt(a['loss'])} | "
                         f"{_pct(base.get('score'))} | {_pct(a['score'])} |")
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
