"""Training throughput: comparisons measured in one run on the same model, data, batch and sequence
length, under the same DeepSpeed ZeRO-3 config:

1. mtl_scale (sharing=hard) against the usual stack — Hugging Face ``Trainer`` + PEFT LoRA with
   ``TrainingArguments(deepspeed=<the dict mtl_scale builds>)`` — in tokens/s;
2. soft sharing (one adapter per task) against hard (one shared adapter), in step time;
3. with ``--surgery``: PCGrad against plain summation for K = 2, 4, 8 tasks (bench/surgery_overhead.py);
4. with ``--variants ours-soft,ours-adaptive``: the adaptive controller's overhead (adaptive sampling with
   an update every step, the worst case, plus DWA loss weights) against plain soft sharing, in step time;
5. with ``--data realistic`` (GSM8K + a long-tailed instruction mix): batching.mode padded / grouped /
   packed against HF Trainer as is and with group_by_length, and TRL SFTTrainer packing (if trl is
   importable), in pad fraction and effective (non-padding) tokens/s; and ZeRO-2 against ZeRO-3 step
   time for the packed run (a base that fits whole on every rank).

    python -m bench.throughput --rounds 2 --steps 30 [--surgery] [--nprocs 2] [key=value ...]
    python -m bench.throughput --data realistic --rounds 1 --steps 10    # batching modes vs HF / TRL
    python -m bench.throughput --nprocs 1 --data synthetic model.path=/ckpt/llama-8b \\
        max_seq_len=2048 micro_batch_size=4 model.gradient_checkpointing=true      # one GPU

Two DeepSpeed engines in one process are fragile, so every measurement is its own launch of
bench/throughput_worker.py on ``--nprocs`` ranks. The launches alternate in ABBA order (ours-hard,
hf, ours-soft, ours-soft, hf, ours-hard per round), so slow drift of a shared machine hits every
variant alike; the ratios are of per-variant medians over the launches.

On CUDA the runs use bf16 (unless ``model.dtype`` is overridden) and the summary prints MFU:
achieved model FLOP/s over the GPU's peak dense bf16 FLOP/s (``flops_per_token`` gives the
convention, in bench/common.py; ``--peak-tflops`` or $MTL_SCALE_PEAK_TFLOPS overrides the table).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.common import RESULT_TAG, mfu, peak_tflops, write_realistic_tasks, write_synthetic_tasks
from mtl_scale.process_group import deepspeed_command, run_group

ROOT = Path(__file__).resolve().parent.parent

# variant -> (worker stack, run-config overrides)
VARIANTS = {
    "ours-hard": ("ours", ["sharing=hard"]),
    "hf": ("hf", ["sharing=hard"]),
    "ours-soft": ("ours", ["sharing=soft"]),
    "ours-adaptive": ("ours", ["sharing=soft", "sampling.strategy=adaptive", "sampling.adaptive.every_steps=1",
                               "loss.task_weighting=dwa"]),
    # batching (--data realistic): the same token budget per micro-batch for every packed / grouped variant,
    # micro_batch_size x max_seq_len, the largest a padded micro-batch can be (see budget_overrides)
    "ours-grouped": ("ours", ["sharing=hard", "batching.mode=grouped"]),
    "ours-packed": ("ours", ["sharing=hard", "batching.mode=packed"]),
    "ours-packed-zero2": ("ours", ["sharing=hard", "batching.mode=packed", "deepspeed_config=ds_configs/zero2.json"]),
    # packed with attention per example (mtl_scale/attention.py), rows of the whole budget
    "ours-packed-varlen": ("ours", ["sharing=hard", "batching.mode=packed", "model.attn_implementation=sdpa_varlen"]),
    "hf-grouped": ("hf-grouped", ["sharing=hard"]),
    "trl-packed": ("trl-packed", ["sharing=hard", "batching.mode=packed"]),
}
PACKED_VARIANTS = ("ours-packed", "ours-packed-varlen")
"""ours packed with sdpa's dense block-diagonal mask, and with attention per example (sdpa_varlen)."""
BATCHING_VARIANTS = "ours-hard,ours-grouped,ours-packed,ours-packed-varlen,hf,hf-grouped,trl-packed,ours-packed-zero2"
"""--data realistic's default variants: ours-hard is mtl_scale's padded batching."""

# The benchmark's geometry: the demo's 4 tasks, 16 examples per micro-batch per rank, one micro-batch
# per task draw and 4 draws per step (gradient accumulation 4). Proportional sampling draws tasks in
# the proportions of the mixed dataset the Trainer shuffles, so both stacks see the same example mix.
BASE_OVERRIDES = ["micro_batch_size=16", "max_seq_len=64", "sampling.tasks_per_step=4",
                  "sampling.micro_batches_per_task=1", "sampling.strategy=proportional", "eval.every_steps=0"]


# ---------------------------------------------------------------------------------------------
# Pure pieces (unit-tested in tests/test_throughput_bench.py)


def abba_order(variants: list[str], rounds: int) -> list[str]:
    """Each round runs the variants forward then backward (A B C C B A): every variant's launches
    sit at the same mean position, so linear drift of the machine cancels out of the ratios."""
    return (list(variants) + list(reversed(variants))) * rounds


def variant_medians(results: list[dict]) -> dict[str, dict]:
    """Per variant, the median over its launches of step time and tokens/s (and the launch count)."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    return {v: {"launches": len(rs),
                "step_time_s": statistics.median(r["step_time_s"] for r in rs),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "tokens_per_step": statistics.median(r["tokens"] / r["steps"] for r in rs),
                "controller_s": statistics.median(r.get("controller_s") or 0.0 for r in rs),
                "pad_fraction": statistics.median(r.get("pad_fraction", 0.0) for r in rs)}
            for v, rs in by_variant.items()}


def parse_result(output: str) -> dict:
    """The worker's result line (rank 0 prints it once)."""
    m = re.search(rf"^{RESULT_TAG} (\{{.*\}})$", output, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no {RESULT_TAG} line in the worker's output")
    return json.loads(m.group(1))


def budget_overrides(cfg) -> list[str]:
    """grouped / packed micro-batches get the token budget of the largest padded micro-batch
    (micro_batch_size x max_seq_len): none may be bigger than what a padded run must fit in memory."""
    return [f"batching.max_tokens={cfg.micro_batch_size * cfg.max_seq_len}"]


def print_stage_choices(config: str = "configs/llama3_8b_8gpu.yaml", gpus: int = 8, gpu_memory: float = 80) -> dict:
    """What ``deepspeed_config: auto`` picks for the example 8B and 70B models (8 x 80 GiB), and why."""
    from mtl_scale.config import load_config
    from mtl_scale.plan.shape import load_model_config, model_shape
    from mtl_scale.stage_choice import choose_stage

    out = {}
    for model in ("configs/models/llama-3.1-8b.json", "configs/models/llama-3.1-70b.json"):
        choice = choose_stage(load_config(ROOT / config), model_shape(*load_model_config(str(ROOT / model))),
                              1, gpus, gpu_memory)
        out[model] = {"deepspeed_config": choice.deepspeed_config, "reason": choice.reason}
        print(f"STAGE {Path(model).stem} on {gpus} x {gpu_memory:g} GiB ({config}): {choice.reason}")
    return out


# ---------------------------------------------------------------------------------------------
# Launching


def launch(module: str, args: list[str], nprocs: int, timeout: float, env: dict) -> str:
    """``deepspeed --num_gpus nprocs --module module args`` from the repository root, killed afterwards
    whatever happened; the output, or an error carrying its tail."""
    cmd = deepspeed_command(nprocs, module, args, module=True)
    res = run_group(cmd, timeout, env, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"exit {res.returncode}: {' '.join(cmd)}\n--- output ---\n{res.stdout[-20000:]}")
    return res.stdout


def measure_surgery(ks: list[int], steps: int, nprocs: int, timeout: float, env: dict,
                    overrides: list[str]) -> dict[int, dict]:
    """bench.surgery_overhead (sum and pcgrad alternating ABBA inside one run) for each K."""
    out = {}
    for k in ks:
        text = launch("bench.surgery_overhead", ["--steps", str(steps), "--tasks", str(k), *overrides],
                      nprocs, timeout, env)
        ms = dict(re.findall(r"median step time (\w+): ([\d.]+) ms", text))
        ratio = re.search(r"RATIO pcgrad/sum = ([\d.]+)", text)
        if ratio is None or not {"sum", "pcgrad"} <= set(ms):
            raise RuntimeError(f"bench.surgery_overhead --tasks {k}: no result in its output\n{text[-5000:]}")
        out[k] = {"sum_ms": float(ms["sum"]), "pcgrad_ms": float(ms["pcgrad"]), "ratio": float(ratio.group(1))}
        print(f"surgery K={k}: sum {ms['sum']} ms, pcgrad {ms['pcgrad']} ms, pcgrad/sum {out[k]['ratio']:.3f}",
              flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# The driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each launches every variant twice)")
    parser.add_argument("--once", action="store_true", help="each variant launched once, no ABBA (smoke tests)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per launch")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--nprocs", type=int, default=2, help="ranks (GPUs, or CPU processes without one)")
    parser.add_argument("--variants", help=f"subset of {','.join(VARIANTS)} (default: ours-hard,hf,ours-soft; "
                        f"with --data realistic {BATCHING_VARIANTS})")
    parser.add_argument("--data", choices=["builtin", "synthetic", "realistic"], default="builtin",
                        help="the demo's 4 builtin tasks, 4 synthetic tasks of exactly max_seq_len tokens, or "
                             "realistic lengths (GSM8K + a long-tailed instruction mix) for the batching modes")
    parser.add_argument("--realistic-examples", type=int, default=400, help="examples per realistic task")
    parser.add_argument("--synthetic-examples", type=int, default=256, help="examples per synthetic task")
    parser.add_argument("--surgery", action="store_true", help="also PCGrad vs sum for K=2,4,8 (a few minutes)")
    parser.add_argument("--surgery-steps", type=int, default=30, help="steps per method in the surgery runs")
    parser.add_argument("--peak-tflops", type=float, default=float(os.environ.get("MTL_SCALE_PEAK_TFLOPS", 0)) or None,
                        help="peak dense bf16 TFLOP/s per GPU for MFU (default: by device name)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per launch")
    parser.add_argument("--json", help="also write every launch's result, the medians and the ratios here")
    parser.add_argument("--profile", metavar="DIR", help="cProfile rank 0 of every launch into DIR/<stack>-<sharing>-"
                        "<n>.prof (compare two with python -m bench.profile_diff); the timings then include "
                        "the profiler's")
    parser.add_argument("--kernel-profile", metavar="DIR", help="torch.profiler on rank 0's timed steps of every "
                        "launch: DIR/<stack>-<sharing>-<n>.json (Chrome trace: chrome://tracing, Perfetto) and .txt "
                        "(operators and kernels by self time, GPU time on CUDA)")
    parser.add_argument("overrides", nargs="*", help="run-config key=value for both stacks (model.path=...)")
    args = parser.parse_args()
    variants = (args.variants or (BATCHING_VARIANTS if args.data == "realistic" else "ours-hard,hf,ours-soft")).split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    if "trl-packed" in variants and importlib.util.find_spec("trl") is None:
        print("trl is not installed: the trl-packed variant is skipped (pip install trl to include it)", flush=True)
        variants.remove("trl-packed")

    import torch
    from mtl_scale.config import load_config
    from mtl_scale.model import load_tokenizer, resolve_model_path

    on_cuda = torch.cuda.is_available()
    dtype = ["model.dtype=bf16"] if on_cuda and not any(o.startswith("model.dtype=") for o in args.overrides) else []
    overrides = [*BASE_OVERRIDES, *dtype, *args.overrides]
    env = {"MTL_SCALE_PROFILE": str(Path(args.profile).resolve())} if args.profile else {}
    if args.kernel_profile:
        env["MTL_SCALE_KERNEL_PROFILE"] = str(Path(args.kernel_profile).resolve())
    if not on_cuda and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the machine's cores: the same explicit share for every stack (accelerate and
        # mtl_scale would each pick one otherwise, by different rules).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nprocs))
    tmp = Path(tempfile.mkdtemp(prefix="mtl_scale_throughput_"))
    try:
        if args.data == "synthetic":
            cfg = load_config(ROOT / "configs/demo.yaml", overrides)
            tokenizer = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
            overrides += write_synthetic_tasks(tokenizer, tmp, 4, args.synthetic_examples, cfg.max_seq_len)
        if args.data == "realistic":
            if not any(o.startswith("max_seq_len=") for o in args.overrides):
                overrides.append("max_seq_len=512")  # GSM8K is 160-1620 tokens in the byte-level tokenizer
            if not any(o.startswith("micro_batch_size=") for o in args.overrides):
                overrides.append("micro_batch_size=8")  # 2 CPU ranks: a step of 4 x 4096 tokens takes seconds
            cfg = load_config(ROOT / "configs/demo.yaml", overrides)
            tokenizer = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
            overrides += write_realistic_tasks(tokenizer, tmp, args.realistic_examples, cfg.max_seq_len)
        cfg = load_config(ROOT / "configs/demo.yaml", overrides)  # fails here, not in every launch, on a bad key
        budget = budget_overrides(cfg)
        print(f"{args.nprocs} ranks, {'cuda' if on_cuda else 'cpu'}, {cfg.model.path} ({cfg.model.dtype}), "
              f"{len(cfg.tasks)} tasks ({args.data}), micro-batch {cfg.micro_batch_size}/rank x "
              f"{cfg.sampling.tasks_per_step} accumulation, max_seq_len {cfg.max_seq_len}, LoRA r={cfg.lora.r} "
              f"on {','.join(cfg.lora.target_modules)}; {args.warmup} warm-up + {args.steps} timed steps per launch",
              flush=True)
        order = variants if args.once else abba_order(variants, args.rounds)
        results = []
        for i, variant in enumerate(order):
            stack, extra = VARIANTS[variant]
            worker_args = ["--stack", stack, "--warmup", str(args.warmup), *overrides, *extra,
                           *(budget if any(e.startswith("batching.mode=") for e in extra) else []),
                           f"max_steps={args.warmup + args.steps}"]
            r = parse_result(launch("bench.throughput_worker", worker_args, args.nprocs, args.timeout, env))
            r["variant"] = variant
            results.append(r)
            print(f"[{i + 1}/{len(order)}] {variant:9s} median step {1000 * r['step_time_s']:7.1f} ms  "
                  f"{r['tokens_per_s']:9.0f} tokens/s  ({r['tokens']} tokens in {r['steps']} steps, "
                  f"{r['elapsed_s']:.1f} s, pad {100 * r['pad_fraction']:.1f}%)", flush=True)
        surgery = measure_surgery([2, 4, 8], args.surgery_steps, args.nprocs, args.timeout, env,
                                  [*dtype, *args.overrides]) if args.surgery else {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = report(results, surgery, args.peak_tflops)
    if args.data == "realistic":
        summary["stage_choices"] = print_stage_choices()
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


def ratios(med: dict[str, dict], surgery: dict[int, dict]) -> dict[str, float]:
    """The comparisons the benchmark exists for, from per-variant medians."""
    out = {}
    if {"ours-hard", "hf"} <= set(med):
        out["ours-hard/hf tokens_per_s"] = med["ours-hard"]["tokens_per_s"] / med["hf"]["tokens_per_s"]
        out["ours-hard/hf step_time"] = med["ours-hard"]["step_time_s"] / med["hf"]["step_time_s"]
    if {"ours-soft", "ours-hard"} <= set(med):
        out["ours-soft/ours-hard step_time"] = med["ours-soft"]["step_time_s"] / med["ours-hard"]["step_time_s"]
    if {"ours-adaptive", "ours-soft"} <= set(med):
        out["ours-adaptive/ours-soft step_time"] = med["ours-adaptive"]["step_time_s"] / med["ours-soft"]["step_time_s"]
        # the controller's own share, timed inside the step loop: free of the launch-to-launch noise above
        out["ours-adaptive controller/step_time"] = med["ours-adaptive"]["controller_s"] / med["ours-adaptive"]["step_time_s"]
    others = [v for v in ("hf", "hf-grouped", "trl-packed") if v in med]
    best = max(others, key=lambda v: med[v]["tokens_per_s"]) if others else None
    for ours in [v for v in PACKED_VARIANTS if v in med]:
        if "ours-hard" in med:
            out[f"{ours}/ours-padded tokens_per_s"] = med[ours]["tokens_per_s"] / med["ours-hard"]["tokens_per_s"]
        if best:
            out[f"{ours}/best-hf-trl({best}) tokens_per_s"] = med[ours]["tokens_per_s"] / med[best]["tokens_per_s"]
    if {"ours-grouped", "ours-hard"} <= set(med):
        out["ours-grouped/ours-padded tokens_per_s"] = \
            med["ours-grouped"]["tokens_per_s"] / med["ours-hard"]["tokens_per_s"]
    if {"ours-packed-zero2", "ours-packed"} <= set(med):
        out["zero2/zero3 step_time (ours-packed)"] = \
            med["ours-packed-zero2"]["step_time_s"] / med["ours-packed"]["step_time_s"]
    for k, s in surgery.items():
        out[f"pcgrad/sum K={k} step_time"] = s["ratio"]
    return out


TARGETS = {"ours-hard/hf tokens_per_s": "(target >= 1.0)", "ours-soft/ours-hard step_time": "(target <= 1.05)",
           "ours-adaptive/ours-soft step_time": "(target <= 1.02)", "ours-adaptive controller/step_time": "(target <= 0.02)",
           **{f"{v}/ours-padded tokens_per_s": "(target >= 1.6)" for v in PACKED_VARIANTS}}


def report(results: list[dict], surgery: dict[int, dict], peak_override: float | None) -> dict:
    med = variant_medians(results)
    first = {r["variant"]: r for r in results}
    print("\nvariant            stack       launches  ZeRO  threads  trainable params  tokens/step  median step  "
          " tokens/s    pad     MFU       (tokens: non-padding)")
    for v, m in med.items():
        r = first[v]
        peak = peak_tflops(r["device_name"], peak_override) if r["device"] == "cuda" else None
        m["mfu"] = mfu(m["tokens_per_s"], r["flops_per_token"], peak, r["world"]) if peak else None
        util = f"{100 * m['mfu']:6.3g}%" if peak else "      -"
        print(f"{v:18s} {r['stack']:11s} {m['launches']:9d} {r['zero_stage']:5d} {r['threads']:8d} "
              f"{r['trainable_params']:17,d} {m['tokens_per_step']:12.0f} {1000 * m['step_time_s']:9.1f} ms "
              f"{m['tokens_per_s']:10.0f} {100 * m['pad_fraction']:5.1f}% {util}")
    out = ratios(med, surgery)
    for name, value in out.items():
        shown = f"{value:.3f}" if value >= 0.01 else f"{value:.2e}"  # the controller's share is ~1e-4
        target = "(target >= 1.3)" if "/best-hf-trl(" in name else TARGETS.get(name, "")
        print(f"RATIO {name} = {shown}  {target}".rstrip())
    return {"results": results, "medians": med, "ratios": out, "surgery": surgery}


if __name__ == "__main__":
    main()
