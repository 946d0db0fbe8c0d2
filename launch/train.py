"""Train LoRA adapters on several tasks at once under DeepSpeed.

Usage and options: mtl_scale/commands/train.py (``--help``); installed, the same is the ``mtl-train`` command.
"""
from mtl_scale.commands.train import cli

if __name__ == "__main__":
    cli()
