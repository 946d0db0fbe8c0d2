"""Deployment: serving checks for task adapters, merged adapters with a per-task retention report,
hybrid exports, a verdict on what to ship, and a full merged checkpoint.

    report = merge_run("runs/demo", methods=["auto"])     # see mtl_scale/commands/merge.py

Merging is PEFT's ``add_weighted_adapter``, on the updates ΔW = B·A (``DELTA_METHODS``: cat, the exact
sum, and the ``*_svd`` variants), or on B alone for adapters that share one frozen A (``FACTOR_METHODS``,
``lora.shared_a``); factor-wise merges of adapters with different A are refused (cross terms B_i·A_j).
Every method is tried at each global scale; method and scale are chosen on validation examples (half of
each task's held-out examples) and reported on the other half. What merging costs each task is measured
there: held-out loss and score (the task's metric) of the base, the task's own adapter, and each merged
adapter, and the *retention* = merged score / own-adapter score.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from mtl_scale.adapters import SHARED, adapter_names, adapters_for_task, write_adapter_dir
from mtl_scale.config import load_config
from mtl_scale.data.prepare import prepare_tasks
from mtl_scale.errors import UserError
from mtl_scale.evaluate import evaluate_model
from mtl_scale.model import DTYPES, load_tokenizer, resolve_device_map, resolve_model_path

log = logging.getLogger(__name__)

# On ΔW = B·A: exact task arithmetic for any adapters (cat), or on ΔW then truncated (svd variants).
DELTA_METHODS = ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd")
# On A and B separately: only for adapters that share A (lora.shared_a), where they act on B alone.
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
METHODS = DELTA_METHODS + FACTOR_METHODS
SAME_RANK_METHODS = FACTOR_METHODS
# Global scales swept for every method (each task's weight times the scale): 1.0 is the plain sum of the
# task updates, which PEFT's docs recommend; 1/K averaging shrinks every task's update K-fold.
DEFAULT_SCALES = (1.0, 0.75, 0.5)
RETENTION_TARGET = 0.90
"""A merged artifact ships when its worst task keeps this share of its own adapter's score."""
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
    """Merge adapters ``names`` of the PeftModel ``model`` into a new adapter ``new_name``.

    ΔW methods (``DELTA_METHODS``) are PEFT's add_weighted_adapter on the updates ΔW_i = s_i·B_i·A_i:
    ``cat`` is exactly Σ w_i·ΔW_i; the ``*_svd`` variants combine the ΔW_i, then truncate to ``svd_rank``,
    by default the sum of the ranks, so that the plain sum fits whole. Factor-wise methods
    (``FACTOR_METHODS``) are refused unless the adapters share A (``lora.shared_a``): PEFT combines A and B
    separately, (Σ√w·B)(Σ√w·A), which for different A holds K²−K cross terms B_i·A_j. With one A they merge
    the B matrices alone and keep A, Σ w_i·B_i·A = (Σ w_i·B_i)·A, which is task arithmetic (ties/dare:
    on B).
    """
    check_mergeable({n: model.peft_config[n].to_dict() for n in names}, method)
    torch.manual_seed(0)  # DARE drops entries at random: the same merge every time
    if method in FACTOR_METHODS:
        _check_shared_a(model, names, method)
        _merge_b(model, names, method, weights, new_name, density)
        return
    kwargs = {}
    if method.endswith("_svd") or method == "svd":
        kwargs.update(svd_rank=svd_rank or sum(model.peft_config[n].r for n in names), svd_full_matrices=False)
    if method in ("ties_svd", "dare_linear_svd", "dare_ties_svd"):
        kwargs["density"] = density
    model.add_weighted_adapter(names, weights, new_name, combination_type=method, **kwargs)


def shares_a(model, names: list[str]) -> bool:
    """Whether adapters ``names`` hold the very same A in every LoRA layer (as ``lora.shared_a`` trains them)."""
    from mtl_scale.adapters import tuner_layers

    for layer in tuner_layers(model):
        a = [layer.lora_A[n].weight for n in names if n in layer.lora_A]
        if any(x.shape != a[0].shape or not torch.equal(x, a[0]) for x in a[1:]):
            return False
    return True


def _check_shared_a(model, names: list[str], method: str) -> None:
    if len(names) > 1 and not shares_a(model, names):
        raise UserError(f"merge method {method} combines A and B separately; adapters {', '.join(names)} have "
                        "different A, so the result holds cross terms B_i·A_j and is not the sum of their updates. "
                        f"Use a ΔW method ({', '.join(DELTA_METHODS)}), or train with lora.shared_a=true")


def _merge_b(model, names: list[str], method: str, weights: list[float], new_name: str, density: float) -> None:
    """Shared-A merge: the new adapter's A is s·A (its own scaling is 1), its B PEFT's merge of the B_i."""
    from peft.utils import merge_utils

    from mtl_scale.adapters import tuner_layers

    combine = {"linear": lambda b, w: merge_utils.task_arithmetic(b, w),
               "ties": lambda b, w: merge_utils.ties(b, w, density),
               "dare_linear": lambda b, w: merge_utils.dare_linear(b, w, density),
               "dare_ties": lambda b, w: merge_utils.dare_ties(b, w, density)}[method]
    # a one-adapter merge builds the new adapter's structure: rank r, alpha = r (scaling 1); filled below
    model.add_weighted_adapter(names[:1], [1.0], new_name, combination_type="linear")
    for layer in tuner_layers(model):
        if new_name not in layer.lora_A:
            continue
        a = layer.lora_A[names[0]].weight.detach()
        b = combine([layer.lora_B[n].weight.detach() for n in names], torch.tensor(weights, dtype=a.dtype))
        layer.lora_A[new_name].weight.data = a * layer.scaling[names[0]]
        layer.lora_B[new_name].weight.data = b.to(a.dtype)


def save_adapter_dir(model, name: str, out: Path, base_path: str, pad_to: int | None = None) -> Path:
    """One adapter of a (non-partitioned) PeftModel in the standard PEFT layout. ``pad_to``: a larger rank,
    reached with zero rows of A and zero columns of B (the same update; alpha is raised with the rank so
    that the scaling, alpha / r or alpha / sqrt(r) with rsLoRA, stays what it was)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    config = model.peft_config[name]
    if pad_to is not None and pad_to > config.r:
        if config.rank_pattern or config.alpha_pattern:
            raise ValueError(f"adapter {name!r}: padding per-module ranks (rank_pattern/alpha_pattern) is not supported")
        extra = pad_to - config.r
        state = {k: torch.nn.functional.pad(v, (0, 0, 0, extra)) if ".lora_A." in k
                 else torch.nn.functional.pad(v, (0, extra)) if ".lora_B." in k else v for k, v in state.items()}
        ratio = pad_to / config.r
        config = replace(config, r=pad_to, lora_alpha=config.lora_alpha * (ratio ** 0.5 if config.use_rslora else ratio))
    return write_adapter_dir(config, state, out, base_path)


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


def retention_se(merged: dict, own: dict) -> float | None:
    """One standard error of ``retention`` from sampling the held-out examples: the delta method on two
    independent scores, each with at most a Bernoulli's variance p(1 - p) / n (a score in [0, 1] with mean
    p has no more; Bhatia-Davis), p taken as (hits + 1) / (n + 2) so that a score of 0 or 1 on few
    examples is not called certain. Both are scored on the same examples and correlate positively, so
    this overstates the noise rather than hides it: for a task near 20% it is +-0.4 at 50 examples,
    +-0.28 at 100 (docs/RESULTS.md: a retention of 0.80 on 100 examples was 1.03 on 500 fresh ones)."""
    m, o = merged["score"], own["score"]
    if o <= 0:
        return None

    def var(score: float, n: int) -> float:
        p = (score * n + 1) / (n + 2)
        return p * (1 - p) / n

    return math.sqrt(var(m, merged["n"]) / o ** 2 + m ** 2 * var(o, own["n"]) / o ** 4)


def near_target(per_task: dict, se: dict, target: float) -> list[str]:
    """Tasks whose retention lies within two standard errors of ``target``: on other examples they could
    fall on the other side of it, whichever side they are on now."""
    return [t for t, r in per_task.items() if r is not None and se.get(t) and abs(r - target) < 2 * se[t]]


def _worst(per_task: dict, se: dict) -> tuple[float | None, float | None]:
    """(lowest known retention, its standard error)."""
    known = {t: r for t, r in per_task.items() if r is not None}
    if not known:
        return None, None
    t = min(known, key=known.get)
    return known[t], se.get(t)


def split_for_selection(tasks: dict, val_examples: int | None = None, eval_examples: int | None = None):
    """(validation tasks, report tasks): each task's held-out examples cut in two disjoint parts, so that
    the merge method and scale are chosen on examples other than those the report states.

    Validation: the last ``val_examples`` held-out examples (default: half, rounded down); report: the
    first of the rest, at most ``eval_examples``. Both are unseen in training (the held-out split never
    trains), and which example goes where depends only on the run's seeded split.
    """
    val, report = {}, {}
    for name, task in tasks.items():
        h = task.held_out
        n_val = len(h) // 2 if val_examples is None else val_examples
        if len(h) - n_val < 1 or n_val < 1:
            raise UserError(f"task {name!r} has {len(h)} held-out examples; choosing a merge on "
                            f"{n_val} of them (--val-examples) must leave at least one on each side. "
                            "Raise the task's eval_size or change --val-examples")
        n_report = len(h) - n_val if eval_examples is None else min(eval_examples, len(h) - n_val)
        val[name] = replace(task, held_out=h.rows(len(h) - n_val, len(h)))
        report[name] = replace(task, held_out=h.rows(0, n_report))
    return val, report


def merge_run(run_dir: str | Path, methods: list[str], weights: list[float] | None = None, density: float = 0.5,
              svd_rank: int | None = None, full_model: str | None = "best", max_shard_size: str = "5GB",
              eval_examples: int | None = None, out_dir: str | Path | None = None,
              device_map: str | None = "auto", scales: list[float] | None = None,
              val_examples: int | None = None) -> dict:
    """Merge a run's task adapters with each method and global scale, choose on validation examples,
    report on held-out ones, write the merged adapters, the serving exports, the report with its verdict,
    and (optionally) a full merged checkpoint.

    Each (method, scale) merges the task adapters with weights ``scale · weights`` (default 1.0 each); per
    method the scale with the best validation retention is kept, and the method with the best validation
    retention is ``best``. Hybrid runs merge the task adapters and add the shared one whole, and also
    write both single-adapter-per-request exports (:func:`export_hybrid`).

    ``full_model``: "best" (the best merge; under hard sharing the shared adapter; under hybrid sharing
    always the shared adapter, the base of export (a)), an adapter
    name under <run>/adapters, a method name, or None. It is folded into the one base loaded for
    everything here, after the last evaluation. ``device_map``: see ``mtl_scale.model.resolve_device_map``.
    """
    from peft import PeftModel

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a finished mtl_scale run (no config.yaml); pass the training output_dir")
    cfg = load_config(run / "config.yaml")
    out = Path(out_dir or run / "merged")
    out.mkdir(parents=True, exist_ok=True)
    adapters_root = run / "adapters"
    task_names = [t.name for t in cfg.tasks]
    # Only this run's adapters: a directory shared with an earlier run may hold others.
    names = [n for n in adapter_names(cfg.sharing, task_names) if (adapters_root / n / "adapter_config.json").is_file()]
    if not names:
        raise UserError(f"no adapters of this run ({', '.join(adapter_names(cfg.sharing, task_names))}) under "
                        f"{adapters_root}")
    if cfg.sharing == "hybrid" and SHARED not in names:
        raise UserError(f"{run} is a hybrid run but {adapters_root / SHARED} is missing: every task needs it")
    task_adapters = [t for t in task_names if t in names]
    auto = methods in (["auto"], ["all"])
    methods = list(METHODS) if auto else methods
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UserError(f"unknown merge method {unknown[0]!r}; choose from {', '.join(METHODS)} or auto")
    weights = weights or [1.0] * len(task_adapters)
    if task_adapters and len(weights) != len(task_adapters):
        raise UserError(f"--weights gives {len(weights)} weights for {len(task_adapters)} task adapters "
                        f"({', '.join(task_adapters)})")
    scales = list(scales or DEFAULT_SCALES)

    base_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    val_tasks, tasks = split_for_selection(prepare_tasks(cfg, tokenizer), val_examples, eval_examples)
    model = PeftModel.from_pretrained(load_base(base_path, cfg.model.dtype, cfg.model.trust_remote_code, device_map),
                                      str(adapters_root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters_root / name), adapter_name=name)
    model.eval()

    def evaluate(active: list[str], on: dict, only: list[str] | None = None) -> dict:
        model.base_model.set_adapter(active)  # several at once: hybrid's shared + task, as in training
        return evaluate_model(model, tokenizer, on, cfg.eval, only=only)

    report: dict = {"run": str(run), "sharing": cfg.sharing, "tasks": task_names,
                    "weights": dict(zip(task_adapters, weights)), "scales": scales,
                    "split": {"validation": {t: len(d.held_out) for t, d in val_tasks.items()},
                              "report": {t: len(d.held_out) for t, d in tasks.items()}},
                    # hybrid: the exports a server loads, filled below (the run's task adapters are r=task_r)
                    "serving": {} if cfg.sharing == "hybrid" else {n: serving_warnings(adapters_root / n) for n in names},
                    "base": {}, "own": {}, "own_validation": {}, "merged": {}, "retention": {},
                    "retention_se": {}, "validation": {}, "errors": {}}
    with model.disable_adapter():
        report["base"] = evaluate_model(model, tokenizer, tasks, cfg.eval)
    for task in task_names:
        own = [a for a in adapters_for_task(cfg.sharing, task) if a in names]
        if own:
            for key, on in (("own", tasks), ("own_validation", val_tasks)):
                result = evaluate(own, on, only=[task])
                if task in result:  # tasks without examples cannot be scored
                    report[key][task] = {"adapter": "+".join(own), **result[task]}
    scored = [t for t in task_adapters if t in report["own"]]
    if cfg.sharing == "hybrid":  # the shared adapter alone: the single-adapter option of the verdict
        report["shared_only"] = evaluate([SHARED], tasks)
        report["shared_only_retention"] = {t: retention(report["shared_only"][t], report["own"][t]) for t in scored}
        report["shared_only_retention_se"] = {t: retention_se(report["shared_only"][t], report["own"][t])
                                              for t in scored}
        report["hybrid_exports"] = export_hybrid(model, task_adapters, adapters_root, out, base_path)
        report["serving"] = {f"{kind}/{t}": serving_warnings(Path(path)) for kind in ("on_full", "cat")
                             for t, path in report["hybrid_exports"][kind].items()}

    if len(task_adapters) >= 2:
        for method in methods:
            if auto and method in FACTOR_METHODS and not shares_a(model, task_adapters):
                report["errors"][method] = ("skipped: the task adapters do not share A (train with "
                                            "lora.shared_a=true); factor-wise merges would add cross terms")
                continue
            try:
                chosen = _best_scale(model, cfg, method, task_adapters, weights, scales, density, svd_rank,
                                     evaluate, val_tasks, report)
            except UserError as e:
                report["errors"][method] = str(e)
                log.warning("merge %s skipped: %s", method, e)
                continue
            name = f"merged_{method}"
            report["merged"][method] = evaluate([name], tasks)
            report["retention"][method] = {t: retention(report["merged"][method][t], report["own"][t])
                                           for t in scored}
            report["retention_se"][method] = {t: retention_se(report["merged"][method][t], report["own"][t])
                                              for t in scored}
            save_adapter_dir(model, name, out / "adapters" / method, base_path)
            report["validation"][method] = chosen

    if report["validation"]:
        best = max(report["validation"], key=lambda m: _rank_key(report["validation"][m]))
        v = report["validation"][best]
        ranking = sorted(report["validation"].items(), key=lambda x: -x[1]["mean_retention"])
        tried = ", ".join(f"{m} x{r['scale']:g} {r['mean_retention']:.2f}" for m, r in ranking)
        known = _known(report["retention"][best])
        worst, worst_se = _worst(report["retention"][best], report["retention_se"][best])
        report["best"] = {"method": best, "scale": v["scale"], "mean_retention": _mean(known),
                          "worst_retention": worst, "worst_retention_se": worst_se,
                          "why": f"highest mean score retention on the validation examples ({tried})"}
    report["verdict"] = verdict(report, cfg, names, adapters_root, out, base_path)

    full = _full_model_source(full_model, report, names, out, adapters_root)
    if full is not None:  # last: folding changes the base weights, which every evaluation above needed clean
        adapter, source = full
        target = out / "full_model"
        save_merged_model(model, adapter, target, base_path, max_shard_size, cfg.model.trust_remote_code)
        report["full_model"] = {"path": str(target), "from_adapter": str(source)}
    _write_report(report, out)
    return report


def _best_scale(model, cfg, method, task_adapters, weights, scales, density, svd_rank, evaluate, val_tasks,
                report) -> dict:
    """Merge with every scale, score each on the validation examples, keep the best as ``merged_<method>``."""
    best, kept = None, None
    tried = {}
    for scale in scales:
        name = f"merged_{method}_x{scale:g}".replace(".", "p")  # a dot would split PEFT's module keys
        merge_tasks = f"{name}_tasks" if cfg.sharing == "hybrid" else name
        add_merged_adapter(model, task_adapters, method, [scale * w for w in weights], merge_tasks, density, svd_rank)
        if cfg.sharing == "hybrid":  # every task applies the shared adapter whole: add it exactly (cat)
            add_merged_adapter(model, [SHARED, merge_tasks], "cat", [1.0, 1.0], name)
            model.delete_adapter(merge_tasks)
        result = evaluate([name], val_tasks)
        per_task = {t: retention(result[t], report["own_validation"][t]) for t in report["own_validation"]
                    if t in result}
        entry = {"scale": scale, "mean_retention": _mean(_known(per_task)),
                 "worst_retention": min(_known(per_task), default=None), "retention": per_task,
                 "loss": _mean([result[t]["loss"] for t in result])}
        tried[f"{scale:g}"] = entry
        if best is None or _rank_key(entry) > _rank_key(best):
            if kept is not None:
                model.delete_adapter(kept)
            best, kept = entry, name
        else:
            model.delete_adapter(name)
    _rename_adapter(model, kept, f"merged_{method}")
    return {**best, "tried": tried}


def _rank_key(entry: dict):
    """Best mean retention, then best worst task, then lowest loss."""
    worst = entry["worst_retention"]
    return entry["mean_retention"], -1.0 if worst is None else worst, -entry["loss"]


def _rename_adapter(model, old: str, new: str) -> None:
    """PEFT has no rename: merge the adapter into a one-adapter copy (linear, weight 1: exact)."""
    model.add_weighted_adapter([old], [1.0], new, combination_type="linear")
    model.delete_adapter(old)


def _known(per_task: dict) -> list[float]:
    return [v for v in per_task.values() if v is not None]


def export_hybrid(model, tasks: list[str], adapters_root: Path, out: Path, base_path: str) -> dict:
    """The hybrid run for servers that apply one adapter per request (vLLM):

    (a) ``on_full/<task>``: the task adapters as trained (zero-padded to a rank vLLM accepts), for the
        base with the shared adapter folded in
        (``full_model/``, written at the end of :func:`merge_run`);
    (b) ``cat/<task>``: cat(shared, task) on the untouched base, rank r + task_r, zero-padded up to a rank
        vLLM accepts. Both compute what base + shared + task computed in training.
    """
    root = out / "hybrid"
    full = out / "full_model"
    written = {"on_full": {}, "cat": {}, "full_model": str(full)}
    for task in tasks:
        dest = root / "on_full" / task
        shutil.rmtree(dest, ignore_errors=True)  # padded like (b): vLLM refuses ranks below 8 (hybrid.task_r=4)
        written["on_full"][task] = str(save_adapter_dir(model, task, dest, str(full),
                                                        pad_to=vllm_rank(model.peft_config[task].r)))

        name = f"cat_{task}"
        add_merged_adapter(model, [SHARED, task], "cat", [1.0, 1.0], name)
        written["cat"][task] = str(save_adapter_dir(model, name, root / "cat" / task, base_path,
                                                    pad_to=vllm_rank(model.peft_config[name].r)))
        model.delete_adapter(name)
    return written


def vllm_rank(r: int) -> int:
    """The smallest LoRA rank vLLM accepts that holds rank ``r`` (``r`` itself past the largest)."""
    return next((v for v in VLLM_RANKS if v >= r), r)


def verdict(report: dict, cfg, names: list[str], adapters_root: Path, out: Path, base_path: str,
            target: float = RETENTION_TARGET) -> dict:
    """What to ship, by worst-task score retention on the report examples: the merged adapter if it
    reaches ``target``; else the one adapter of a hard run, or hybrid's shared adapter alone, if it does;
    else the multi-adapter bundle (every task its own adapters: retention 1 by construction)."""
    options = {}
    if "best" in report:
        best = report["best"]["method"]
        options["merged"] = {"worst_retention": report["best"]["worst_retention"],
                             "worst_retention_se": report["best"].get("worst_retention_se"),
                             "near_target": near_target(report.get("retention", {}).get(best, {}),
                                                        report.get("retention_se", {}).get(best, {}), target),
                             "artifact": str(out / "adapters" / best),
                             "what": f"one merged adapter ({best}, scale {report['best']['scale']:g})"}
    if cfg.sharing == "hard":
        options["single"] = {"worst_retention": 1.0, "artifact": str(adapters_root / SHARED),
                             "what": "the shared adapter every task trained"}
    elif cfg.sharing == "hybrid":
        se = report.get("shared_only_retention_se", {})
        worst, worst_se = _worst(report["shared_only_retention"], se)
        options["single"] = {"worst_retention": worst, "worst_retention_se": worst_se,
                             "near_target": near_target(report["shared_only_retention"], se, target),
                             "artifact": str(adapters_root / SHARED), "what": "the shared adapter alone"}
    task_adapters = [n for n in names if n != SHARED]
    if task_adapters:
        if cfg.sharing == "hybrid":
            base, dirs = str(out / "full_model"), report["hybrid_exports"]["on_full"]
            what = "the base with the shared adapter folded in, plus one adapter per task"
        else:
            base, dirs = base_path, {t: str(adapters_root / t) for t in task_adapters}
            what = "the base plus one adapter per task"
        rank = vllm_rank(max(json.loads((Path(d) / "adapter_config.json").read_text())["r"] for d in dirs.values()))
        options["bundle"] = {"worst_retention": 1.0, "artifact": base, "what": what,
                             "serve": f"vllm serve {base} --enable-lora --max-loras {len(dirs)} "
                                      f"--max-lora-rank {rank} --lora-modules "
                                      + " ".join(f"{t}={d}" for t, d in dirs.items())}
    ship = next((k for k in ("merged", "single", "bundle") if k in options
                 and options[k]["worst_retention"] is not None and options[k]["worst_retention"] >= target), None)
    return {"target": target, "ship": ship, "options": options}


def _full_model_source(choice: str | None, report: dict, names: list[str], out: Path, adapters_root: Path):
    """The adapter to fold into the base: (its name in the loaded PeftModel, its directory), or None."""
    if choice is None:
        return None
    if choice == "best":
        if report["sharing"] == "hybrid":  # export (a): the base every task adapter of the bundle goes on
            return SHARED, adapters_root / SHARED
        if "best" in report:
            return f"merged_{report['best']['method']}", out / "adapters" / report["best"]["method"]
        own = SHARED if SHARED in names else names[0]
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


def verdict_lines(v: dict) -> list[str]:
    what = {"merged": "the merged adapter", "single": "the single adapter", "bundle": "the multi-adapter bundle"}
    head = (f"**Verdict: ship {what[v['ship']]}**" if v["ship"] else "**Verdict: nothing reaches the target**")
    lines = ["## Verdict", "", f"{head} (worst-task score retention >= {v['target']:.2f} on the report "
             "examples; options in order of preference):", ""]
    for key, o in v["options"].items():
        r, se = o["worst_retention"], o.get("worst_retention_se")
        shown = "n/a" if r is None else f"{r:.2f}" + (f" ± {se:.2f} (one standard error)" if se else "")
        lines.append(f"- {key}: {o['what']} — worst-task retention {shown}; `{o['artifact']}`")
        if o.get("near_target"):
            lines.append(f"  - within two standard errors of the {v['target']:.2f} bar on "
                         f"{', '.join(o['near_target'])}: other held-out examples could reverse this call; raise "
                         "the tasks' eval_size for a firmer verdict")
        if "serve" in o:
            lines.append(f"  - serve: `{o['serve']}`")
    return lines


def _write_report(report: dict, out: Path) -> None:
    lines = ["# Merge report", "", f"Run: `{report['run']}` (sharing={report['sharing']}); task weights "
             f"{report['weights']} times a global scale from {report['scales']}.", ""]
    lines += verdict_lines(report["verdict"]) + [""]
    split = report["split"]
    lines += [f"Method and scale chosen on validation examples {split['validation']}; every number below is on "
              f"the other held-out examples {split['report']} (disjoint).", ""]
    if report["merged"]:
        lines += ["Score in each task's metric; retention = merged / own-adapter score (each method at its chosen "
                  "scale).", "",
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
    if "hybrid_exports" in report:
        e = report["hybrid_exports"]
        lines += ["", "## Hybrid exports (one adapter per request)", "",
                  f"- (a) `{e['full_model']}` (base + shared, stock transformers) with the task adapters "
                  f"under `{Path(next(iter(e['on_full'].values()))).parent}`",
                  f"- (b) cat(shared, task) on the untouched base under `{Path(next(iter(e['cat'].values()))).parent}`"]
        for t, r in report["shared_only_retention"].items():
            lines.append(f"- shared adapter alone on {t}: retention {'-' if r is None else f'{r:.2f}'}")
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
