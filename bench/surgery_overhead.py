"""Step time of PCGrad (per-task shards + one K×K all-reduce + write-back) over plain summation, on
the real trainer, measured in one run: the same process alternates sum and pcgrad steps in ABBA
blocks so that machine noise hits both alike.

    deepspeed --num_gpus 2 --module bench.surgery_overhead [--steps 40] [--tasks 4] [--method pcgrad] [key=value ...]

Prints per-method median step time and the ratio. GPU-ready: pass model.dtype=bf16 on CUDA.
"""
import argparse
import statistics
import sys
import time

import torch

from mtl_scale.cli import run_entry
from mtl_scale.config import load_config
from mtl_scale import adapters
from mtl_scale.engine import Surgery
from mtl_scale.trainer import activator, setup, train_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="steps per method")
    parser.add_argument("--tasks", type=int, default=4, help="tasks (builtin generators, cycled)")
    parser.add_argument("--method", default="pcgrad")
    parser.add_argument("--local_rank", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    gens = ["copy", "reverse", "sort", "add"]
    tasks = ", ".join(f"{{name: t{i}, source: 'builtin:{gens[i % 4]}', num_examples: 400, eval_size: 0}}"
                      for i in range(args.tasks))
    cfg = load_config("configs/demo.yaml", [f"tasks=[{tasks}]", "sharing=hard", f"sampling.tasks_per_step={args.tasks}",
                                            "sampling.strategy=uniform", "eval.every_steps=0",
                                            f"max_steps={2 * args.steps + 4}", *args.overrides])
    run = setup(cfg)
    shared = list(adapters.lora_parameters(run.model, adapters.SHARED).values())
    surgery = Surgery(args.method, shared, cfg.seed)
    activate = activator(run)
    times = {"sum": [], args.method: []}
    for step in range(2 * args.steps + 4):
        method = "sum" if step % 4 in (0, 3) else args.method  # ABBA
        run.surgery = surgery if method != "sum" else None
        torch.distributed.barrier()
        t0 = time.perf_counter()
        train_step(run, step, activate)  # the whole training step: draw, loss scales, backward, surgery, update
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= 4:  # warm-up
            times[method].append(time.perf_counter() - t0)
    if run.rank == 0:
        med = {m: statistics.median(v) for m, v in times.items()}
        k = len(cfg.tasks)
        print(f"world={run.world} K={k} steps/method={args.steps} tasks_in_step~{k} "
              f"device={'cuda' if torch.cuda.is_available() else 'cpu'}")
        for m, v in med.items():
            print(f"median step time {m}: {1000 * v:.1f} ms")
        print(f"RATIO {args.method}/sum = {med[args.method] / med['sum']:.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    run_entry(main)
