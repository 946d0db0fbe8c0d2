"""Evaluate the base model and a run's trained adapters on every task's held-out examples.

Usage and options: mtl_scale/commands/evaluate.py (``--help``); installed, the same is the ``mtl-eval`` command.
"""
from mtl_scale.commands.evaluate import cli

if __name__ == "__main__":
    cli()
