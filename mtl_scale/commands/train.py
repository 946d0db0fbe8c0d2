"""Train LoRA adapters on several tasks at once under DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml sharing=soft max_steps=50
    deepspeed --hostfile hosts launch/train.py --config configs/llama3_8b_8gpu.yaml
"""
import argparse

from mtl_scale.cli import run_entry
from mtl_scale.config import load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config (defaults apply to keys it leaves out)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. lora.r=16")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)

    from mtl_scale.trainer import train
    train(cfg)


def cli() -> None:
    """The ``mtl-train`` command (and launch/train.py)."""
    run_entry(main)


if __name__ == "__main__":
    cli()
