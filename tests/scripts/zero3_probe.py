"""Test driver (run under the deepspeed launcher): a few optimizer steps of the real trainer, recording
what ZeRO-3 does with the switching adapters (mtl_scale/zero3_adapters.py).

Writes <output_dir>/rank<r>_zero3.json:
  trace_complete  per step: whether ZeRO-3's module trace was complete (prefetching) after it
  reduced         per micro-batch: {"active": [adapters applied], "reduced": {adapter: LoRA tensors reduced}}
  adapter_tensors {adapter: its LoRA tensors}
  lora_whole      whether every LoRA matrix is persistent and gathered after the last step
  base_partitioned  whether every frozen weight matrix of the LoRA layers is partitioned (not persistent)
  persistent      ZeRO-3's persistent parameters: how many, how many of them LoRA matrices
  post_step_gathers  per step: all-gather collectives in the optimizer's post-step
  lora_in_place   per step: whether every LoRA matrix still has the memory it had before the first step
  lora_one_buffer whether all LoRA matrices are views of one buffer
"""
import json
import sys
from pathlib import Path

import deepspeed.comm.comm as ds_comm

from mtl_scale import adapters
from mtl_scale.cli import run_entry
from mtl_scale.config import load_config
from mtl_scale.trainer import activator, setup, train_step


def main():
    cfg = load_config(sys.argv[1], sys.argv[2:])
    run = setup(cfg)
    optimizer = run.engine.optimizer
    adapter_of = {id(p): name for name in run.adapter_names for p in adapters.lora_parameters(run.model, name).values()}
    per_micro_batch = []

    # The call ZeRO-3 makes for each gradient it actually reduces (below mtl_scale's skip).
    reduce = optimizer.reduce_independent_p_g_buckets_and_remove_grads

    def counting_reduce(param):
        reduced = per_micro_batch[-1]["reduced"]
        reduced[adapter_of[id(param)]] = reduced.get(adapter_of[id(param)], 0) + 1
        return reduce(param)
    optimizer.reduce_independent_p_g_buckets_and_remove_grads = counting_reduce

    activate, current = activator(run), [None]

    def tracking_activate(task):
        current[0] = task
        activate(task)

    forward = run.engine.forward

    def recording_forward(*args, **kwargs):
        per_micro_batch.append({"active": adapters.adapters_for_task(cfg.sharing, current[0]), "reduced": {}})
        return forward(*args, **kwargs)
    run.engine.forward = recording_forward

    # The collectives of the post-step gather of persistent parameters (zero3_adapters.keep_persistent_gathered).
    post_step_gathers, counting = [], [False]
    for fn in ("all_gather_into_tensor", "all_gather"):
        def counted(*args, _fn=getattr(ds_comm.cdb, fn), **kwargs):
            if counting[0]:
                post_step_gathers[-1] += 1
            return _fn(*args, **kwargs)
        setattr(ds_comm.cdb, fn, counted)
    post_step = optimizer._post_step

    def counting_post_step(*args, **kwargs):
        post_step_gathers.append(0)
        counting[0] = True
        try:
            return post_step(*args, **kwargs)
        finally:
            counting[0] = False
    optimizer._post_step = counting_post_step

    coordinator = optimizer.parameter_offload.get_param_coordinator()
    lora = list(adapters.lora_parameters(run.model).values())
    before = [p.data_ptr() for p in lora]
    trace_complete, in_place = [], []
    run.engine.train()
    for step in range(cfg.max_steps):
        train_step(run, step, tracking_activate)
        trace_complete.append(coordinator.is_complete_trace())
        in_place.append([p.data_ptr() for p in lora] == before)
    tensors = {name: len(adapters.lora_parameters(run.model, name)) for name in run.adapter_names}
    lora_ids = {id(p) for p in lora}
    base = [p for layer in adapters.tuner_layers(run.model) for p in layer.base_layer.parameters() if len(p.ds_shape) >= 2]
    (Path(cfg.output_dir) / f"rank{run.rank}_zero3.json").write_text(json.dumps(
        {"trace_complete": trace_complete, "reduced": per_micro_batch, "adapter_tensors": tensors,
         "lora_whole": all(p.ds_persist and p.shape == p.ds_shape for p in lora),
         "base_partitioned": bool(base) and all(not p.ds_persist and p.ds_tensor.numel() < p.ds_numel for p in base),
         "persistent": {"all": len(optimizer.persistent_parameters),
                        "lora": sum(id(p) in lora_ids for p in optimizer.persistent_parameters)},
         "lora_count": len(lora), "post_step_gathers": post_step_gathers,
         "lora_in_place": in_place, "lora_one_buffer": len({p.untyped_storage().data_ptr() for p in lora}) == 1}))


if __name__ == "__main__":
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    run_entry(main)
