"""Train LoRA adapters on several tasks at once under DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml sharing=soft max_steps=50
    deepspeed --hostfile hosts launch/train.py --config configs/llama3_8b_8gpu.yaml

The implementation (and --help): mtl_scale/commands/train.py; installed, the same is the ``mtl-train`` command.
"""
from mtl_scale.commands.train import cli

if __name__ == "__main__":
    cli()
