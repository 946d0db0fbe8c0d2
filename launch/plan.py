"""Per-GPU memory plan of a LoRA run under DeepSpeed ZeRO: does it fit, and if not, what would.

    python launch/plan.py --config configs/llama3_8b_8gpu.yaml
    python launch/plan.py --model configs/models/llama-3.1-70b.json --nodes 2 --gpus-per-node 8 --seq-len 4096
    python launch/plan.py --config configs/llama3_8b_8gpu.yaml --offload optimizer --json sharing=hard

The formulas and their measured error: docs/MEMORY.md.

Installed, the same is the ``mtl-plan`` command (mtl_scale/plan/cli.py).
"""
from mtl_scale.plan.cli import cli

if __name__ == "__main__":
    cli()
