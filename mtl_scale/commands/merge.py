"""Turn a run's adapters into something to serve.

    python launch/merge.py runs/demo                       # all methods, keep the best (auto)
    python launch/merge.py runs/demo --method ties --density 0.3 --weights 0.4 0.2 0.2 0.2
    python launch/merge.py runs/demo --method svd --svd-rank 16 --full-model svd

Writes <run>/merged/: adapters/<method>/ (standard PEFT), full_model/ (sharded safetensors + tokenizer,
loadable by stock transformers), merge_report.md and merge_report.json (per-task exact match and
loss for base, own adapter and each merge, with retention), and prints the retention table.

Memory: one copy of the base is loaded, every evaluation runs on it, and the chosen adapter is folded
into it in place at the end (the full checkpoint needs no second base). With CUDA the base is spread
over all visible GPUs (device_map "auto") by default; --no-device-map keeps it on the CPU.
"""
import argparse

from mtl_scale.cli import run_entry


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run's output_dir")
    parser.add_argument("--method", nargs="+", default=["auto"],
                        help="linear cat svd ties dare_linear dare_ties, or auto (all, keep the best)")
    parser.add_argument("--weights", nargs="+", type=float, help="one per task adapter (default: equal)")
    parser.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of entries kept")
    parser.add_argument("--svd-rank", type=int, help="svd: rank of the merged adapter (default: max rank)")
    parser.add_argument("--full-model", default="best",
                        help="adapter or method to fold into the base (default: best merge; 'none' to skip)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--eval-examples", type=int, help="held-out examples per task (default: the run's)")
    parser.add_argument("--out", help="output directory (default <run>/merged)")
    parser.add_argument("--device-map", default="auto",
                        help="from_pretrained device_map for the base (default auto: spread over all visible "
                             "GPUs when CUDA is available, a plain CPU model otherwise; e.g. cuda:0, cpu)")
    parser.add_argument("--no-device-map", dest="device_map", action="store_const", const="none",
                        help="no device map: load the whole base onto the CPU, unplaced")
    args = parser.parse_args()

    from mtl_scale.merge import merge_run, retention_table
    report = merge_run(args.run, args.method, args.weights, args.density, args.svd_rank,
                       None if args.full_model == "none" else args.full_model, args.max_shard_size,
                       args.eval_examples, args.out, args.device_map)
    if report["merged"]:
        print(retention_table(report))
    if "best" in report:
        print(f"\nbest: {report['best']['method']} — {report['best']['why']}")
    for name, warnings in report["serving"].items():
        for w in warnings:
            print(f"serving warning: adapter {name}: {w}")
    if "full_model" in report:
        print(f"full merged checkpoint: {report['full_model']['path']}")


def cli() -> None:
    """The ``mtl-merge`` command (and launch/merge.py)."""
    run_entry(main)


if __name__ == "__main__":
    cli()
