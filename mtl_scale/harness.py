"""EleutherAI lm-evaluation-harness (``lm_eval``, the optional ``harness`` extra) on the base model, a run's
adapters and a merged full model, for ``launch/evaluate.py --harness TASKS``.

Scores are ``{model: {task: {metric: value}}}`` with lm_eval's metric keys (``"exact_match,strict-match"``:
metric, then filter). The tasks shipped in ``harness_tasks/`` (gsm8k_local) read local files and run
offline; stock tasks (gsm8k, mmlu, hellaswag, ...) fetch their hub datasets and need the network.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import yaml

from mtl_scale import adapters as adapters_mod
from mtl_scale.config import RunConfig
from mtl_scale.errors import UserError
from mtl_scale.model import DTYPES, resolve_device_map, resolve_model_path

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
DEFAULT_GSM8K = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
LM_EVAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--harness {spec!r}: give comma-separated lm-eval task names, e.g. gsm8k_local,mmlu")
    return tasks


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--harness needs EleutherAI's lm-evaluation-harness: pip install -e '.[harness]'") from None


def local_tasks() -> dict[str, Path]:
    """The shipped task yamls by task name."""
    return {yaml.safe_load(p.read_text())["task"]: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def write_local_tasks(out_dir: Path, gsm8k: str | Path | None = None) -> Path:
    """Copies of the shipped yamls under ``out_dir`` with absolute data paths: the datasets json loader resolves
    a relative data_files path against the working directory, not the yaml's."""
    gsm8k = Path(gsm8k or DEFAULT_GSM8K).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, src in local_tasks().items():
        spec = yaml.safe_load(src.read_text())
        if name == "gsm8k_local":
            spec["dataset_kwargs"]["data_files"] = {"test": str(gsm8k)}
        (out_dir / src.name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return out_dir


def fold(lm_eval_results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``simple_evaluate``'s output: the numeric ``metric,filter`` entries
    (not name, alias, sample_len; a stderr lm_eval could not compute is the string "N/A" and is dropped)."""
    return {task: {k: float(v) for k, v in row.items()
                   if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, row in lm_eval_results["results"].items()}


def harness_table(scores: dict) -> str:
    """Markdown: one row per task and metric (stderr left out), one column per model evaluated."""
    models = list(scores)
    rows = {}  # (task, metric) in first-seen order
    for per_task in scores.values():
        for task, metrics in per_task.items():
            for metric in metrics:
                if "_stderr," not in metric:
                    rows.setdefault((task, metric), None)
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for task, metric in rows:
        vals = [scores[m].get(task, {}).get(metric) for m in models]
        lines.append(f"| {task} | {metric} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def adapter_sets(sharing: str, task_names: list[str], root: Path) -> dict[str, list[Path]]:
    """Name (as in eval.json's adapters) -> the adapter directories applied together."""
    names = adapters_mod.adapter_names(sharing, task_names)
    missing = [n for n in names if not (root / n / "adapter_config.json").is_file()]
    if missing:
        raise UserError(f"no trained adapter {missing[0]!r} under {root} (expected {', '.join(names)}); "
                        "train first, or point --adapters at a run's adapters/ directory")
    if sharing == "hard":
        return {adapters_mod.SHARED: [root / adapters_mod.SHARED]}
    return {"+".join(combo): [root / n for n in combo]
            for combo in (adapters_mod.adapters_for_task(sharing, t) for t in task_names)}


def hf_placement(device_map: str | None) -> dict:
    """lm_eval's HFLM placement for launch/evaluate.py's --device-map: auto spreads the model over every
    visible GPU (parallelize: accelerate's device map), none means one device, anything else names it."""
    import torch
    if device_map == "auto" and torch.cuda.is_available():
        return {"parallelize": True}
    if device_map in ("auto", "none", None):
        return {"device": "cuda:0" if torch.cuda.is_available() else "cpu"}
    return {"device": device_map}


@contextmanager
def hub_offline(enabled: bool = True):
    """HF_HUB_OFFLINE and HF_DATASETS_OFFLINE for the duration: no hub look-up, nor a wait on an unreachable
    network. huggingface_hub and datasets read the variables once, when imported, so the flags they already
    read are switched as well; all is restored afterwards."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants
    flags = [(mod, name) for mod, name in [(huggingface_hub.constants, "HF_HUB_OFFLINE"),
                                           (datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
             if hasattr(mod, name)]  # the names differ between datasets versions
    saved_flags = [getattr(mod, name) for mod, name in flags]
    saved_env = {v: os.environ.get(v) for v in OFFLINE_VARS}
    os.environ.update({v: "1" for v in OFFLINE_VARS})
    for mod, name in flags:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for (mod, name), value in zip(flags, saved_flags):
            setattr(mod, name, value)
        for v, value in saved_env.items():
            if value is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = value


def run_harness(cfg: RunConfig, tasks: list[str], adapters_dir: str | None = None, merged: str | None = None,
                include_base: bool = True, limit: float | None = None, device_map: str | None = "auto",
                gsm8k: str | None = None) -> dict:
    """Run lm_eval's ``simple_evaluate`` (model "hf") on the base, on each adapter set of the run under
    ``adapters_dir`` (default ``<output_dir>/adapters``) and on ``merged`` (a full model directory);
    returns ``{"base" | adapter name | "merged": {task: {metric: value}}}``. ``limit``: examples per task."""
    require_lm_eval()
    import tempfile

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model_path = resolve_model_path(cfg.model.path)
    if merged is not None and not (Path(merged) / "config.json").is_file():
        raise UserError(f"--harness-merged {merged}: not a full model directory (no config.json); "
                        "give launch/merge.py's merged/full_model")
    task_names = [t.name for t in cfg.tasks]
    sets = adapter_sets(cfg.sharing, task_names, Path(adapters_dir or Path(cfg.output_dir) / "adapters"))

    local = set(tasks) <= set(local_tasks())
    if "gsm8k_local" in tasks and not Path(gsm8k or DEFAULT_GSM8K).is_file():
        raise UserError(f"gsm8k_local reads {gsm8k or DEFAULT_GSM8K}, which does not exist; "
                        "point --harness-gsm8k at a GSM8K test.jsonl (question, answer)")
    tmp = tempfile.TemporaryDirectory(prefix="mtl_scale_harness_")
    # Only the shipped tasks requested: skip indexing lm_eval's thousands of stock task yamls.
    task_manager = TaskManager(include_path=str(write_local_tasks(Path(tmp.name), gsm8k)), include_defaults=not local)
    model_args = {"pretrained": model_path, "dtype": LM_EVAL_DTYPES[cfg.model.dtype],
                  "trust_remote_code": cfg.model.trust_remote_code, **hf_placement(device_map)}
    device = model_args.pop("device", None)

    def evaluate(model, **extra) -> dict:
        kw = {} if isinstance(model, HFLM) else {"model_args": {**model_args, **extra}, "device": device}
        out = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=task_manager,
                                      batch_size=cfg.eval.batch_size, log_samples=False, **kw)
        return fold(out)

    scores: dict = {}
    # The network stays on when a model is a hub id (it may not be in the local cache yet).
    with tmp, hub_offline(local and Path(model_path).is_dir()):
        if include_base:
            log.info("harness: base %s", model_path)
            scores["base"] = evaluate("hf")
        single = {name: dirs[0] for name, dirs in sets.items() if len(dirs) == 1}
        for name, adapter in single.items():  # hard, soft: lm_eval loads the adapter itself (peft=)
            log.info("harness: adapter %s", name)
            scores[name] = evaluate("hf", peft=str(adapter))
        stacked = {name: dirs for name, dirs in sets.items() if len(dirs) > 1}
        if stacked:
            scores.update(_evaluate_stacked(cfg, model_path, stacked, device_map, evaluate, HFLM))
        if merged is not None:
            log.info("harness: merged %s", merged)
            scores["merged"] = evaluate("hf", pretrained=str(Path(merged).resolve()))
    return scores


def _evaluate_stacked(cfg: RunConfig, model_path: str, stacked: dict[str, list[Path]], device_map, evaluate,
                      HFLM) -> dict:
    """Hybrid sharing: each task runs with shared + its own adapter applied together. lm_eval's ``peft=`` loads
    one adapter, so the base is loaded here once with every adapter, the pair is activated (as
    mtl_scale.evaluate does) and the model object is handed to lm_eval. Scoring the shared and the task
    adapter apart would score neither model that was trained; folding them into a copy of the base per task
    would cost a base copy each."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    import torch

    placed = resolve_device_map(device_map)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.model.dtype], device_map=placed,
                                                trust_remote_code=cfg.model.trust_remote_code)
    if placed is None and torch.cuda.is_available():
        base = base.cuda()
    model = None
    for dirs in stacked.values():
        for d in dirs:
            if model is None:
                model = PeftModel.from_pretrained(base, str(d), adapter_name=d.name)
            elif d.name not in model.peft_config:
                model.load_adapter(str(d), adapter_name=d.name)
    model.eval()
    scores = {}
    for name, dirs in stacked.items():
        log.info("harness: adapters %s", name)
        model.base_model.set_adapter([d.name for d in dirs])
        lm = HFLM(pretrained=model, tokenizer=model_path, batch_size=cfg.eval.batch_size,
                  trust_remote_code=cfg.model.trust_remote_code)
        scores[name] = evaluate(lm)
    return scores
