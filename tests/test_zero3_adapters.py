"""Switching adapters under real ZeRO-3 on 2 CPU ranks (mtl_scale/zero3_adapters.py): the module trace
completes although every micro-batch switches adapters, so ZeRO-3 prefetches as in hard sharing;
only the active adapters' gradients are reduced; every LoRA matrix is whole on every rank (the "auto"
persistence threshold) while the base stays partitioned; the LoRA matrices stay in one buffer through
every step, refreshed after it by one collective. (That the trained adapters stay exactly right is
tests/test_equivalence.py's job.)"""
import json

import pytest

from dist import launch

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("sharing,extra", [("soft", []), ("hybrid", ["model.gradient_checkpointing=true"])])
def test_trace_completes_and_only_active_adapters_reduce(sharing, extra, tmp_path, tiny_model_dir):
    launch("tests/scripts/zero3_probe.py",
           ["configs/demo.yaml", f"sharing={sharing}", *extra, f"output_dir={tmp_path}", "max_steps=4", "micro_batch_size=2",
            "sampling.tasks_per_step=4", "sampling.strategy=uniform", "lora.r=4", "hybrid.task_r=2",
            *[f"tasks.{i}.num_examples=24" for i in range(4)]])
    ranks = [json.loads((tmp_path / f"rank{r}_zero3.json").read_text()) for r in range(2)]
    assert ranks[0]["reduced"] == ranks[1]["reduced"]  # the same collectives on both ranks
    probe = ranks[0]
    # DeepSpeed records the trace in the second step and prefetches along it from the third on.
    assert probe["trace_complete"][2:] == [True, True], probe["trace_complete"]
    micro_batches = probe["reduced"]
    assert len(micro_batches) == 4 * 4 and len({tuple(m["active"]) for m in micro_batches}) == 4  # tasks switch
    for m in micro_batches:  # every tensor of each active adapter, once; nothing of the others
        assert m["reduced"] == {name: probe["adapter_tensors"][name] for name in m["active"]}, m
    assert probe["lora_whole"] and probe["base_partitioned"]
    assert probe["persistent"]["lora"] == probe["lora_count"] == sum(probe["adapter_tensors"].values())
    assert probe["persistent"]["all"] > probe["lora_count"]  # the norms too
    # all of them, LoRA matrices of every adapter and norms, in one collective per step
    assert probe["post_step_gathers"] == [1] * 4, probe["post_step_gathers"]
    # never freed and gathered anew (zero3_adapters.keep_persistent_gathered): the same memory after every step
    assert probe["lora_one_buffer"] and probe["lora_in_place"] == [True] * 4, probe["lora_in_place"]
