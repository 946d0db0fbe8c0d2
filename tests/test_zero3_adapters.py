"""Switching adapters under real ZeRO-3 on 2 CPU ranks (mtl_scale/zero3_adapters.py): the module trace
completes although every micro-batch switches adapters, so ZeRO-3 prefetches as in hard sharing;
only the active adapters' gradients are reduced; every LoRA matrix is whole on every rank (the "auto"
persistence threshold) while the base stays partitioned; the LoRA matrices stay in one buffer through
every step, refreshed after it by one collective, and training ends with the very adapters ZeRO-3's own
handling of persistent parameters gives. (That the trained adapters are right against a single-process
reference is tests/test_equivalence.py's job.)"""
import json

import pytest
import torch
from safetensors.torch import load_file

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
    # the LoRA matrices of every adapter in one collective per step; the frozen norms are never gathered again
    assert probe["post_step_gathers"] == [1] * 4, probe["post_step_gathers"]
    # never freed and gathered anew (zero3_adapters.keep_persistent_gathered): the same memory after every step
    assert probe["lora_one_buffer"] and probe["lora_in_place"] == [True] * 4, probe["lora_in_place"]


def _adapters(out):
    return {p.name: load_file(p / "adapter_model.safetensors") for p in sorted((out / "adapters").iterdir())}


def test_kept_persistent_parameters_train_as_deepspeeds_own_path(tmp_path, tiny_model_dir):
    """bf16, a checkpoint mid-run (DeepSpeed frees and re-gathers the kept parameters its own way there):
    bit for bit the adapters of a run without keep_persistent_gathered."""
    args = ["configs/demo.yaml", "sharing=soft", "sampling.strategy=temperature", "model.dtype=bf16", "max_steps=6", "checkpoint.every_steps=3", "micro_batch_size=4",
            "eval.every_steps=0", "eval.max_examples=2",
            *[f"tasks.{i}.{k}" for i in range(4) for k in ("num_examples=40", "eval_size=2")]]
    launch("launch/train.py", ["--config", *args, f"output_dir={tmp_path / 'kept'}"])
    launch("tests/scripts/train_native_persistent.py", [*args, f"output_dir={tmp_path / 'native'}"])
    kept, native = (_adapters(tmp_path / run) for run in ("kept", "native"))
    assert kept.keys() == native.keys() and len(kept) == 4
    for name in kept:
        assert kept[name].keys() == native[name].keys()
        for key in kept[name]:
            assert torch.equal(kept[name][key], native[name][key]), f"{name} {key}"
