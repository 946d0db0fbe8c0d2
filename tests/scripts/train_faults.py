"""Test driver: the real trainer with faults injected on one rank.

Env: FAULT_RANK (which rank), FAULT_NAN_STEPS (comma list of 0-based steps whose loss is NaN there),
FAULT_DIE_STEP (the rank SIGKILLs itself at the start of that step), FAULT_EVAL_OOM_STEP (every
rank's evaluation after that 1-based step raises an out-of-memory error).
"""
import os
import signal
import sys

import torch

import mtl_scale.engine
import mtl_scale.trainer
from mtl_scale.cli import run_entry
from mtl_scale.config import load_config

RANK = int(os.environ.get("FAULT_RANK", "1"))
NAN_STEPS = {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s}
DIE_STEP = int(os.environ.get("FAULT_DIE_STEP", "-1"))
EVAL_OOM_STEP = int(os.environ.get("FAULT_EVAL_OOM_STEP", "-1"))
current = {"step": -1}

real_step, real_loss = mtl_scale.trainer.optimizer_step, mtl_scale.engine.summed_loss
real_eval = mtl_scale.trainer.evaluate_during_training


def step_with_faults(*args, step=0, **kwargs):
    current["step"] = step
    if step == DIE_STEP and int(os.environ["RANK"]) == RANK:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup, no goodbye to the process group
    return real_step(*args, step=step, **kwargs)


def loss_with_faults(*args, **kwargs):
    s = real_loss(*args, **kwargs)
    if current["step"] in NAN_STEPS and int(os.environ["RANK"]) == RANK:
        s = s * torch.tensor(float("nan"))
    return s


def eval_with_faults(*args, **kwargs):
    if current["step"] + 1 == EVAL_OOM_STEP:
        raise torch.OutOfMemoryError("injected: out of memory in the evaluation after step "
                                     f"{EVAL_OOM_STEP}")
    return real_eval(*args, **kwargs)


mtl_scale.trainer.optimizer_step = step_with_faults
mtl_scale.trainer.evaluate_during_training = eval_with_faults
mtl_scale.engine.summed_loss = loss_with_faults


def main():
    mtl_scale.trainer.train(load_config(sys.argv[1], sys.argv[2:]))


if __name__ == "__main__":
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    run_entry(main)
