"""The command-line entry points: launch/*.py in a checkout, mtl-train / mtl-eval / mtl-merge / mtl-plan when installed."""
