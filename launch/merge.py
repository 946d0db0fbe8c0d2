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

The implementation (and --help): mtl_scale/commands/merge.py; installed, the same is the ``mtl-merge`` command.
"""
from mtl_scale.commands.merge import cli

if __name__ == "__main__":
    cli()
