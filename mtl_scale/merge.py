"""Deployment: serving checks for task adapters, merged adapters with a per-task retention report,
and a full merged checkpoint.

    report = merge_run("runs/demo", methods=["auto"])     # see launch/merge.py

Merging is PEFT's ``add_weighted_adapter`` (linear, cat, svd, ties, dare_linear, dare_ties), guarded
against its sharp edges: linear/ties/dare need equal ranks; non-SVD methods combine A and B
*separately* (so a linear merge of several adapters is not the weighted sum of their updates B·A —
cat and svd are exact for that); the merged adapter's config is copied from the first adapter.
What merging costs each task is measured: held-out loss and exact match of the base, the task's own
adapter, and each merged adapter, and the *retention* = merged exact match / own-adapter exact match.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from mtl_scale.adapters import adapter_names, write_adapter_dir
from mtl_scale.config import load_config
from mtl_scale.data.prepare import prepare_tasks
from mtl_scale.errors import UserError
from mtl_scale.evaluate import evaluate_model
from mtl_scale.model import DTYPES, load_tokenizer, resolve_device_map, resolve_model_path

log = logging.getLogger(__name__)

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
SAME_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16


def serving_warnings(adapter_dir: Path) -> list[str]:
    """Why a multi-LoRA server (vLLM) would refuse this adapter, one line each; empty if it would not."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    out = []
    r = cfg.get("r")
    if r not in VLLM_RANKS:
        out.append(f"r={r}: vLLM accepts LoRA ranks {', '.join(map(str, VLLM_RANKS))} only")
    elif r > VLLM_DEFAULT_MAX_LORA_RANK:
        out.append(f"r={r}: start vLLM with --max-lora-rank {r} or higher (its default is {VLLM_DEFAULT_MAX_LORA_RANK})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        out.append("rank_pattern/alpha_pattern: per-module ranks are not supported by vLLM")
    if cfg.get("modules_to_save"):
        out.append(f"modules_to_save={cfg['modules_to_save']}: vLLM loads LoRA weights only")
    if cfg.get("use_dora"):
        out.append("use_dora=true: vLLM does not serve DoRA adapters")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        out.append(f"target_modules is the pattern {targets!r}: vLLM needs a list of module names")
    if cfg.get("target_parameters"):
        out.append("target_parameters: vLLM serves LoRA on modules only")
    return out


def check_mergeable(configs: dict[str, dict], method: str) -> None:
    """PEFT's requirements, checked up front with errors that say which adapter breaks them."""
    ranks = {name: c["r"] for name, c in configs.items()}
    if method in SAME_RANK_METHODS and len(set(ranks.values())) > 1:
        raise UserError(f"merge method {method} needs adapters of equal rank, got {ranks}; use cat or svd "
                        "(any ranks), or merge adapters of one rank")
    targets = {name: c["target_modules"] if isinstance(c["target_modules"], str) else sorted(c["target_modules"])
               for name, c in configs.items()}
    if len({json.dumps(t) for t in targets.values()}) > 1:
        raise UserError(f"adapters target different modules {targets}; merging them would leave some modules "
                        "with only part of the adapters")
    for name, c in configs.items():
        if c.get("use_dora") or c.get("modules_to_save"):
            raise UserError(f"adapter {name!r} uses DoRA or modules_to_save, which add_weighted_adapter cannot merge")


def load_base(path: str, dtype: str, trust_remote_code: bool = False, device_map: str | None = "auto"):
    """The unquantized base, for merging (``device_map``: see ``mtl_scale.model.resolve_device_map``)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(hf_config, "quantization_config", None):
        method = hf_config.quantization_config
        method = method.get("quant_method") if isinstance(method, dict) else getattr(method, "quant_method", method)
        raise UserError(f"the base at {path} is quantized ({method}); merging into quantized weights would round "
                        "the adapter away. Merge into the unquantized base checkpoint (same architecture) instead")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                 device_map=resolve_device_map(device_map))
    return model.eval()


def add_merged_adapter(model, names: list[str], method: str, weights: list[float], new_name: str,
                       density: float = 0.5, svd_rank: int | None = None) -> None:
    """PEFT's add_weighted_adapter with our guards; ``model`` is a PeftModel holding ``names``."""
    check_mergeable({n: model.peft_config[n].to_dict() for n in names}, method)
    kwargs = {}
    if method in ("ties", "dare_linear", "dare_ties"):
        kwargs["density"] = density
    if method == "svd":
        kwargs["svd_rank"] = svd_rank
    torch.manual_seed(0)  # DARE drops entries at random: the same merge every time
    model.add_weighted_adapter(names, weights, new_name, combination_type=method, **kwargs)


def save_adapter_dir(model, name: str, out: Path, base_path: str) -> Path:
    """One adapter of a (non-partitioned) PeftModel in the standard PEFT layout."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return write_adapter_dir(model.peft_config[name], state, out, base_path)


def save_full_model(base_path: str, adapter_dir: Path, out: Path, dtype: str = "fp32",
                    max_shard_size: str = "5GB", trust_remote_code: bool = False,
                    device_map: str | None = "auto") -> Path:
    """Load the base, fold the adapter at ``adapter_dir`` into it and save (:func:`save_merged_model`)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_path, dtype, trust_remote_code, device_map), str(adapter_dir),
                                      adapter_name="full")
    return save_merged_model(model, "full", out, base_path, max_shard_size, trust_remote_code)


def save_merged_model(model, adapter: str, out: Path, base_path: str, max_shard_size: str = "5GB",
                      trust_remote_code: bool = False) -> Path:
    """Fold ``adapter`` of the PeftModel ``model`` into its base weights, in place (``merge_and_unload``:
    the model's other adapters are dropped, and it is a plain transformers model afterwards), and save a
    plain checkpoint (sharded safetensors + tokenizer) that needs neither PEFT nor mtl_scale to load.
    In place, so that merging never holds a second copy of the base (2 x 140 GB of host memory at 70B)."""
    model = model.merge_and_unload(adapter_names=[adapter])
    tokenizer = load_tokenizer(base_path, trust_remote_code)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def retention(merged: dict, own: dict) -> float | None:
    """Merged score over the task's own adapter's score, in the task's metric (None when the latter is 0)."""
    return merged["score"] / own["score"] if own["score"] > 0 else None


def merge_run(run_dir: str | Path, methods: list[str], weights: list[float] | None = None, density: float = 0.5,
              svd_rank: int | None = None, full_model: str | None = "best", max_shard_size: str = "5GB",
              eval_examples: int | None = None, out_dir: str | Path | None = None,
              device_map: str | None = "auto") -> dict:
    """Merge a run's task adapters with each method, evaluate everything on held-out data, write the
    merged adapters, the retention report and (optionally) a full merged checkpoint.

    ``full_model``: "best" (the merged adapter with the best mean retention; the shared adapter under
    hard sharing), an adapter name under <run>/adapters, a method name, or None. It is folded into the
    one base loaded for everything here, after the last evaluation. ``device_map``: see
    ``mtl_scale.model.resolve_device_map``.
    """
    from peft import PeftModel

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a finished mtl_scale run (no config.yaml); pass the training output_dir")
    cfg = load_config(run / "config.yaml")
    if cfg.sharing == "hybrid":
        raise UserError(f"{run} is a hybrid run: merging its adapters is not supported yet. Serve a task as its "
                        "shared + task adapters together (PEFT: base_model.set_adapter(['shared', task])), or fold "
                        "them into one adapter with PEFT's add_weighted_adapter(..., combination_type='cat')")
    out = Path(out_dir or run / "merged")
    out.mkdir(parents=True, exist_ok=True)
    adapters_root = run / "adapters"
    task_names = [t.name for t in cfg.tasks]
    # Only this run's adapters: a directory shared with an earlier run may hold others.
    names = [n for n in adapter_names(cfg.sharing, task_names) if (adapters_root / n / "adapter_config.json").is_file()]
    if not names:
        raise UserError(f"no adapters of this run ({', '.join(adapter_names(cfg.sharing, task_names))}) under "
                        f"{adapters_root}")
    task_adapters = [t for t in task_names if t in names]
    methods = list(METHODS) if methods in (["auto"], ["all"]) else methods
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UserError(f"unknown merge method {unknown[0]!r}; choose from {', '.join(METHODS)} or auto")
    weights = weights or [1.0 / len(task_adapters)] * len(task_adapters) if task_adapters else []
    if task_adapters and len(weights) != len(task_adapters):
        raise UserError(f"--weights gives {len(weights)} weights for {len(task_adapters)} task adapters "
                        f"({', '.join(task_adapters)})")

    base_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    tasks = prepare_tasks(cfg, tokenizer)
    if eval_examples is not None:  # the first N held-out examples (the split itself must not change)
        for task in tasks.values():
            h = task.held_out
            task.held_out = replace(h, input_ids=h.input_ids[:eval_examples], labels=h.labels[:eval_examples],
                                    prompt_lens=h.prompt_lens[:eval_examples], references=h.references[:eval_examples])
    model = PeftModel.from_pretrained(load_base(base_path, cfg.model.dtype, cfg.model.trust_remote_code, device_map),
                                      str(adapters_root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters_root / name), adapter_name=name)
    model.eval()

    report: dict = {"run": str(run), "tasks": task_names, "weights": dict(zip(task_adapters, weights)),
                    "serving": {n: serving_warnings(adapters_root / n) for n in names},
                    "base": {}, "own": {}, "merged": {}, "retention": {}, "errors": {}}
    with model.disable_adapter():
        report["base"] = evaluate_model(model, tokenizer, tasks, cfg.eval)
    for task in task_names:
        own = task if task in names else "shared" if "shared" in names else None
        result = {}
        if own is not None:
            model.set_adapter(own)
            result = evaluate_model(model, tokenizer, tasks, cfg.eval, only=[task])
        if task in result:  # tasks without held-out examples cannot be scored
            report["own"][task] = {"adapter": own, **result[task]}
    scored = [t for t in task_adapters if t in report["own"]]

    if len(task_adapters) >= 2:
        for method in methods:
            merged_name = f"merged_{method}"
            try:
                add_merged_adapter(model, task_adapters, method, weights, merged_name, density, svd_rank)
            except UserError as e:
                report["errors"][method] = str(e)
                log.warning("merge %s skipped: %s", method, e)
                continue
            model.set_adapter(merged_name)
            report["merged"][method] = evaluate_model(model, tokenizer, tasks, cfg.eval)
            report["retention"][method] = {t: retention(report["merged"][method][t], report["own"][t])
                                           for t in scored}
            save_adapter_dir(model, merged_name, out / "adapters" / method, base_path)

    scores = {m: _mean([v for v in r.values() if v is not None]) for m, r in report["retention"].items()}
    if scores:
        best = max(scores, key=lambda m: (scores[m], -_mean([report["merged"][m][t]["loss"] for t in scored])))
        report["best"] = {"method": best, "mean_retention": scores[best],
                          "why": f"highest mean score retention over {len(scored)} tasks "
                                 f"({', '.join(f'{m} {s:.2f}' for m, s in sorted(scores.items(), key=lambda x: -x[1]))})"}

    full = _full_model_source(full_model, report, names, out, adapters_root)
    if full is not None:  # last: folding changes the base weights, which every evaluation above needed clean
        adapter, source = full
        target = out / "full_model"
        save_merged_model(model, adapter, target, base_path, max_shard_size, cfg.model.trust_remote_code)
        report["full_model"] = {"path": str(target), "from_adapter": str(source)}
    _write_report(report, out)
    return report


def _full_model_source(choice: str | None, report: dict, names: list[str], out: Path, adapters_root: Path):
    """The adapter to fold into the base: (its name in the loaded PeftModel, its directory), or None."""
    if choice is None:
        return None
    if choice == "best":
        if "best" in report:
            return f"merged_{report['best']['method']}", out / "adapters" / report["best"]["method"]
        own = "shared" if "shared" in names else names[0]
        return own, adapters_root / own
    if choice in names:
        return choice, adapters_root / choice
    if choice in report["merged"]:
        return f"merged_{choice}", out / "adapters" / choice
    raise UserError(f"--full-model {choice!r}: not an adapter of this run ({', '.join(names)}) nor a merge method "
                    f"that ran ({', '.join(report['merged']) or 'none'})")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def retention_table(report: dict) -> str:
    methods = list(report["merged"])
    head = "| task | metric | base | own adapter | " + " | ".join(f"{m} (retention)" for m in methods) + " |"
    lines = [head, "|---|---|---:|---:|" + "---:|" * len(methods)]
    for t in report["tasks"]:
        if t not in report["own"] or not all(t in report["merged"][m] for m in methods):
            continue
        cells = []
        for m in methods:
            r = report["retention"][m].get(t)
            cells.append(f"{100 * report['merged'][m][t]['score']:.1f}% ({'-' if r is None else f'{r:.2f}'})")
        lines.append(f"| {t} | {report['own'][t]['metric']} | {100 * report['base'][t]['score']:.1f}% | "
                     f"{100 * report['own'][t]['score']:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_report(report: dict, out: Path) -> None:
    lines = ["# Merge report", "", f"Run: `{report['run']}`; task weights {report['weights']}.", ""]
    if report["merged"]:
        lines += ["Exact match on held-out examples; retention = merged / own-adapter exact match.", "",
                  retention_table(report), ""]
        lines += ["| method | " + " | ".join(f"{t} loss" for t in report["tasks"] if t in report["own"]) + " |",
                  "|---|" + "---:|" * len(report["own"])]
        lines.append("| base | " + " | ".join(f"{report['base'][t]['loss']:.3f}" for t in report["own"]) + " |")
        lines.append("| own adapter | " + " | ".join(f"{report['own'][t]['loss']:.3f}" for t in report["own"]) + " |")
        for m, per_task in report["merged"].items():
            lines.append(f"| {m} | " + " | ".join(f"{per_task[t]['loss']:.3f}" for t in report["own"]) + " |")
        lines.append("")
    if "best" in report:
        lines += [f"**Best: {report['best']['method']}** — {report['best']['why']}.", ""]
    for m, e in report["errors"].items():
        lines += [f"- {m}: not run — {e}"]
    lines += ["", "## Serving checks (vLLM multi-LoRA)", ""]
    for name, warnings in report["serving"].items():
        lines.append(f"- `{name}`: " + ("ok" if not warnings else "; ".join(warnings)))
    if "full_model" in report:
        lines += ["", f"Full merged checkpoint: `{report['full_model']['path']}` "
                      f"(from `{report['full_model']['from_adapter']}`), loadable with "
                      "`AutoModelForCausalLM.from_pretrained`."]
    tmp = out / "merge_report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(out / "merge_report.md")
    tmp = out / "merge_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.rename(out / "merge_report.json")
