"""Evaluate the base model and a run's trained adapters on every task's held-out examples.

    python launch/evaluate.py --config configs/demo.yaml            # reads <output_dir>/adapters
    python launch/evaluate.py --config configs/demo.yaml --adapters runs/x/adapters --json eval.json

Prints a table (per task: loss and greedy exact match, base vs adapter) and writes JSON
(default <output_dir>/eval.json).

Standard benchmarks: --harness TASKS runs EleutherAI lm-evaluation-harness (pip install -e '.[harness]') on
the base, each adapter and --harness-merged DIR; scores go to the JSON's "harness" key and a second table.
    python launch/evaluate.py --config configs/gsm8k.yaml --harness gsm8k_local --harness-limit 100
gsm8k_local (shipped, reads --harness-gsm8k) runs offline; stock tasks (gsm8k, mmlu, ...) download their data.

Large bases: with CUDA, the base is spread over all visible GPUs (device_map "auto", accelerate)
by default; --no-device-map (or --device-map none) loads it whole onto one GPU instead. Held-out
loss takes the output head's logits in chunks of eval.loss_chunk_tokens completion positions
(eval.loss_chunk_tokens=0: full logits per batch).
"""
import argparse
import json
from pathlib import Path

from mtl_scale.cli import run_entry
from mtl_scale.config import load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's YAML config")
    parser.add_argument("--adapters", help="directory holding one adapter per subdirectory")
    parser.add_argument("--json", help="where to write the results (default <output_dir>/eval.json)")
    parser.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
    parser.add_argument("--device-map", default="auto",
                        help="from_pretrained device_map for the base (default auto: spread over all visible "
                             "GPUs when CUDA is available, a plain CPU model otherwise; e.g. cuda:0, cpu)")
    parser.add_argument("--no-device-map", dest="device_map", action="store_const", const="none",
                        help="no device map: load the whole base onto one GPU (cuda:0), or CPU without CUDA")
    parser.add_argument("--harness", metavar="TASKS",
                        help="comma-separated lm-evaluation-harness tasks, e.g. gsm8k_local or mmlu,hellaswag")
    parser.add_argument("--harness-merged", metavar="DIR",
                        help="also run the harness tasks on this full model (launch/merge.py's merged/full_model)")
    parser.add_argument("--harness-limit", type=float, metavar="N",
                        help="examples per harness task (below 1: a fraction); quick checks, not benchmark scores")
    parser.add_argument("--harness-gsm8k", metavar="JSONL",
                        help="GSM8K file for gsm8k_local (default <checkout>/../shared/data/gsm8k/test.jsonl)")
    parser.add_argument("--harness-only", action="store_true",
                        help="skip the held-out evaluation; fold the harness scores into the --json file if it exists")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.batch_size=8")
    args = parser.parse_args()
    if args.harness_only and not args.harness:
        parser.error("--harness-only needs --harness TASKS")
    cfg = load_config(args.config, args.overrides)
    if args.harness:  # before the held-out evaluation: a missing lm_eval or an empty list fails at once
        from mtl_scale.harness import harness_table, parse_tasks, require_lm_eval, run_harness
        require_lm_eval()
        harness_tasks = parse_tasks(args.harness)

    from mtl_scale.evaluate import evaluate_run, results_table, write_results
    out = Path(args.json or Path(cfg.output_dir) / "eval.json")
    if args.harness_only:
        results = json.loads(out.read_text()) if out.is_file() else {}
    else:
        results = evaluate_run(cfg, args.adapters, include_base=not args.no_base, device_map=args.device_map)
    if args.harness:
        results["harness"] = run_harness(cfg, harness_tasks, args.adapters, merged=args.harness_merged,
                                         include_base=not args.no_base, limit=args.harness_limit,
                                         device_map=args.device_map, gsm8k=args.harness_gsm8k)
        results["harness_limit"] = args.harness_limit  # null: every example
    write_results(results, out)
    if not args.harness_only:
        print(results_table(results))
    if args.harness:
        print("\n" + harness_table(results["harness"]))
    print(f"\nwritten: {out}")


def cli() -> None:
    """The ``mtl-eval`` command (and launch/evaluate.py)."""
    run_entry(main)


if __name__ == "__main__":
    cli()
