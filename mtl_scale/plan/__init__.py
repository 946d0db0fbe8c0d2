"""The memory planner: a model's exact shapes (shape), the per-GPU estimate (estimate), the command (cli)."""
