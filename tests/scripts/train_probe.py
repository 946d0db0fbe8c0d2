"""Test driver (run under the deepspeed launcher): train with the real trainer, save adapters, then
record what the *trained, partitioned* model computes, for the tests to compare against files.

Writes to <output_dir>:
  probe_logits.pt        {adapter: logits of PROBE_TEXT with that adapter active} (rank 0)
  rank<r>_schedule.json  per step: the task plan and the example indices this rank drew (per micro-batch)
  rank<r>_eval.json      evaluate_during_training's metrics with the chunked held-out loss
                         (eval.loss_chunk_tokens) and with full logits, and this rank's head calls per batch
  rank<r>_varlen.json    sdpa_varlen only: this rank's packed training forwards per layer, those given the
                         engine's example bounds, and those whose bounds equal the position ids'
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

import mtl_scale.evaluate
from mtl_scale import adapters, attention
from mtl_scale.cli import run_entry
from mtl_scale.config import load_config
from mtl_scale.evaluate import evaluate_during_training
from mtl_scale.trainer import activator, finish, setup, train_loop

PROBE_TEXT = ["sort [jihgfe] ->", "add 12 and 30 ->"]


def main():
    cfg = load_config(sys.argv[1], sys.argv[2:])
    varlen = {"packed": 0, "given": 0, "equal": 0}
    attend = attention.sdpa_varlen_forward

    def recording_attend(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
        if attention_mask is None and position_ids is not None and module.training:
            varlen["packed"] += 1
            if kwargs.get("cu_seq_lens_q") is not None:
                varlen["given"] += 1
                own = attention.varlen_kwargs(position_ids.expand(query.shape[0], -1).cpu())
                varlen["equal"] += int(torch.equal(kwargs["cu_seq_lens_q"].cpu(), own["cu_seq_lens_q"])
                                       and kwargs["max_length_q"] == own["max_length_q"])
        return attend(module, query, key, value, attention_mask, *args, position_ids=position_ids, **kwargs)
    attention.sdpa_varlen_forward = recording_attend  # what load_model registers with transformers
    run = setup(cfg)
    # Record the schedule and this rank's example draws by wrapping the sampler.
    drawn, take, take_batch = [], run.sampler.take, run.sampler.take_batch

    def recording_take(task, n):
        idx = take(task, n)
        drawn.append({"task": task, "idx": idx})
        return idx

    def recording_take_batch(task, batcher):  # batching.mode grouped / packed
        idx = take_batch(task, batcher)
        drawn.append({"task": task, "idx": idx})
        return idx
    run.sampler.take, run.sampler.take_batch = recording_take, recording_take_batch
    train_loop(run)
    finish(run)
    out = Path(cfg.output_dir)
    plans = [run.sampler.plan(s) for s in range(cfg.max_steps)]
    (out / f"rank{run.rank}_schedule.json").write_text(json.dumps({"plans": plans, "drawn": drawn}))
    if cfg.model.attn_implementation == attention.NAME:
        (out / f"rank{run.rank}_varlen.json").write_text(json.dumps(varlen))

    # Held-out loss on the trained, partitioned model: chunked (each rank's own head calls recorded) and full.
    calls, head_calls = [], mtl_scale.evaluate.head_calls
    mtl_scale.evaluate.head_calls = lambda *a: calls.append(head_calls(*a)) or calls[-1]
    eval_cfg = replace(cfg.eval, max_new_tokens=1)  # the loss is what is compared; generation kept short
    chunked = evaluate_during_training(run.model, run.tokenizer, run.tasks, eval_cfg, activator(run), run.rank,
                                       run.world)
    full = evaluate_during_training(run.model, run.tokenizer, run.tasks, replace(eval_cfg, loss_chunk_tokens=0),
                                    activator(run), run.rank, run.world)
    (out / f"rank{run.rank}_eval.json").write_text(json.dumps({"chunked": chunked, "full": full,
                                                                "head_calls": calls}))

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
