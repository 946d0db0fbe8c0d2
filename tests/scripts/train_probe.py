"""Test driver (run under the deepspeed launcher): train with the real trainer, save adapters, then
record what the *trained, partitioned* model computes, for the tests to compare against files.

Writes to <output_dir>:
  probe_logits.pt        {adapter: logits of PROBE_TEXT with that adapter active} (rank 0)
  rank<r>_schedule.json  per step: the task plan and the example indices this rank drew
"""
import json
import sys
from pathlib import Path

import torch

from mtl_scale import adapters
from mtl_scale.cli import run_entry
from mtl_scale.config import load_config
from mtl_scale.trainer import finish, setup, train_loop

PROBE_TEXT = ["sort [jihgfe] ->", "add 12 and 30 ->"]


def main():
    cfg = load_config(sys.argv[1], sys.argv[2:])
    run = setup(cfg)
    # Record the schedule and this rank's example draws by wrapping the sampler.
    drawn, take = [], run.sampler.take

    def recording_take(task, n):
        idx = take(task, n)
        drawn.append({"task": task, "idx": idx})
        return idx
    run.sampler.take = recording_take
    train_loop(run)
    finish(run)
    out = Path(cfg.output_dir)
    plans = [run.sampler.plan(s) for s in range(cfg.max_steps)]
    (out / f"rank{run.rank}_schedule.json").write_text(json.dumps({"plans": plans, "drawn": drawn}))

    enc = run.tokenizer(PROBE_TEXT, add_special_tokens=True, padding=True, return_tensors="pt")
    run.engine.eval()
    logits = {}
    with torch.no_grad():
        combos = [[name] for name in run.adapter_names]
        if cfg.sharing == "hybrid":  # what a task's forward uses: both adapters at once
            combos += [adapters.adapters_for_task("hybrid", t) for t in run.tasks]
        for combo in combos:
            adapters.activate(run.model, combo)
            logits["+".join(combo)] = run.engine(input_ids=enc["input_ids"],
                                                 attention_mask=enc["attention_mask"]).logits.cpu()
    if run.is_writer:
        torch.save({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "logits": logits},
                   out / "probe_logits.pt")


if __name__ == "__main__":
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    run_entry(main)
