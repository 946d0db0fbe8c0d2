"""Turn a run's adapters into something to serve.

    python launch/merge.py runs/demo                       # all methods x scales 1.0 0.75 0.5, keep the best (auto)
    python launch/merge.py runs/demo --method ties_svd --density 0.3 --scales 1.0 0.5 --weights 1 1 2 1
    python launch/merge.py runs/demo --method svd --svd-rank 16 --full-model svd

Methods on ΔW = B·A (any run): cat (the exact sum), svd, ties_svd, dare_linear_svd, dare_ties_svd
(rank: the sum of the ranks unless --svd-rank). Factor-wise linear, ties, dare_linear, dare_ties only for
adapters that share A (lora.shared_a=true), where they merge B. Each method is tried at every global
scale (task weights x scale); method and scale are chosen on validation examples (half of each task's
held-out examples, --val-examples) and reported on the other half.

Writes <run>/merged/: adapters/<method>/ (standard PEFT), full_model/ (sharded safetensors + tokenizer,
loadable by stock transformers), merge_report.md and merge_report.json (per-task score, in the task's
metric, and loss for base, own adapter and each merge, with retention, and the verdict: what to ship,
with the vLLM command for a multi-adapter bundle), and prints the retention table and the verdict.
A hybrid run also gets hybrid/on_full/<task>/ (task adapters for full_model/, which is then the base
with the shared adapter folded in) and hybrid/cat/<task>/ (cat(shared, task) for the untouched base).

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
                        help="cat svd ties_svd dare_linear_svd dare_ties_svd (any run), linear ties dare_linear "
                             "dare_ties (shared-A runs only), or auto (all that apply, keep the best)")
    parser.add_argument("--weights", nargs="+", type=float, help="one per task adapter (default: 1.0 each)")
    parser.add_argument("--scales", nargs="+", type=float,
                        help="global scales to try, chosen on validation (default: 1.0 0.75 0.5)")
    parser.add_argument("--val-examples", type=int,
                        help="held-out examples per task to choose method and scale on (default: half)")
    parser.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of entries kept")
    parser.add_argument("--svd-rank", type=int, help="*svd: rank of the merged adapter (default: sum of ranks)")
    parser.add_argument("--full-model", default="best",
                        help="adapter or method to fold into the base (default: best merge; the shared adapter "
                             "for hard and hybrid runs; 'none' to skip)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--eval-examples", type=int,
                        help="report examples per task (default: every held-out example not used for validation)")
    parser.add_argument("--out", help="output directory (default <run>/merged)")
    parser.add_argument("--device-map", default="auto",
                        help="from_pretrained device_map for the base (default auto: spread over all visible "
                             "GPUs when CUDA is available, a plain CPU model otherwise; e.g. cuda:0, cpu)")
    parser.add_argument("--no-device-map", dest="device_map", action="store_const", const="none",
                        help="no device map: load the whole base onto the CPU, unplaced")
    args = parser.parse_args()

    from mtl_scale.merge import merge_run, retention_table, verdict_lines
    report = merge_run(args.run, args.method, args.weights, args.density, args.svd_rank,
                       None if args.full_model == "none" else args.full_model, args.max_shard_size,
                       args.eval_examples, args.out, args.device_map, args.scales, args.val_examples)
    if report["merged"]:
        print(retention_table(report))
    if "best" in report:
        print(f"\nbest: {report['best']['method']} x{report['best']['scale']:g} — {report['best']['why']}")
    print("\n".join(verdict_lines(report["verdict"])))
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
