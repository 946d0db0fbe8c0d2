"""Evaluate the base model and a run's trained adapters on every task's held-out examples.

    python launch/evaluate.py --config configs/demo.yaml            # reads <output_dir>/adapters
    python launch/evaluate.py --config configs/demo.yaml --adapters runs/x/adapters --json eval.json

Prints a table (per task: loss and greedy exact match, base vs adapter) and writes JSON
(default <output_dir>/eval.json).

Large bases: with CUDA, the base is spread over all visible GPUs (device_map "auto", accelerate)
by default; --no-device-map (or --device-map none) loads it whole onto one GPU instead. Held-out
loss takes the output head's logits in chunks of eval.loss_chunk_tokens completion positions
(eval.loss_chunk_tokens=0: full logits per batch).
"""
import argparse
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
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.batch_size=8")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)

    from mtl_scale.evaluate import evaluate_run, results_table, write_results
    results = evaluate_run(cfg, args.adapters, include_base=not args.no_base, device_map=args.device_map)
    out = Path(args.json or Path(cfg.output_dir) / "eval.json")
    write_results(results, out)
    print(results_table(results))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    run_entry(main)
