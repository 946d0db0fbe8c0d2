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

The implementation (and --help): mtl_scale/commands/evaluate.py; installed, the same is the ``mtl-eval`` command.
"""
from mtl_scale.commands.evaluate import cli

if __name__ == "__main__":
    cli()
