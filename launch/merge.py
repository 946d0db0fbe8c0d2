"""Turn a run's adapters into something to serve.

Usage and options: mtl_scale/commands/merge.py (``--help``); installed, the same is the ``mtl-merge`` command.
"""
from mtl_scale.commands.merge import cli

if __name__ == "__main__":
    cli()
