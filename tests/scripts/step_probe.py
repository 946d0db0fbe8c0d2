"""Test driver (run under the deepspeed launcher): take every step through the public API alone
(``trainer.train_step``, as benchmarks and probes do, without train_loop's evaluation, metrics and
checkpoints) and save the adapters, to compare with a train_loop run of the same config."""
import sys

from mtl_scale.cli import run_entry
from mtl_scale.config import load_config
from mtl_scale.trainer import activator, save_adapters, setup, train_step


def main():
    cfg = load_config(sys.argv[1], sys.argv[2:])
    run = setup(cfg)
    activate = activator(run)
    run.engine.train()
    for step in range(cfg.max_steps):
        train_step(run, step, activate)
    run.step = cfg.max_steps
    save_adapters(run)


if __name__ == "__main__":
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    run_entry(main)
