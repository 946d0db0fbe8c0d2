"""Faults on 2 real ranks: non-finite losses skip the step everywhere; a dead rank does not hang the rest."""
import json
import time

import pytest

from dist import launch, launch_two_nodes

pytestmark = pytest.mark.dist

ARGS = ["configs/demo.yaml", "micro_batch_size=4", "sampling.tasks_per_step=2", "eval.every_steps=0",
        "eval.max_examples=2", "sharing=hard"] + [f"tasks.{i}.{k}" for i in range(4) for k in ("num_examples=40", "eval_size=2")]


def test_nan_on_one_rank_skips_the_step_on_all(tmp_path, tiny_model_dir):
    launch("tests/scripts/train_faults.py", [*ARGS, "max_steps=6", f"output_dir={tmp_path}"],
           env={"FAULT_RANK": "1", "FAULT_NAN_STEPS": "2,3"})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step_skipped"] for r in rows] == [0, 0, 1, 1, 0, 0]
    assert rows[-1]["skipped_steps"] == 2
    assert rows[2]["loss"] == "nan"  # written as a string: the line stays valid JSON
    assert all(isinstance(r["loss"], float) for r in rows[4:])  # training went on, finite
    assert (tmp_path / "adapters" / "shared" / "adapter_model.safetensors").is_file()


def test_too_many_consecutive_skips_abort_cleanly(tmp_path, tiny_model_dir):
    res = launch("tests/scripts/train_faults.py", [*ARGS, "max_steps=8", "max_consecutive_skips=3",
                                                   f"output_dir={tmp_path}"],
                 env={"FAULT_RANK": "0", "FAULT_NAN_STEPS": "1,2,3,4,5"}, check=False, timeout=240)
    assert res.returncode != 0
    assert "mtl_scale: error: step 4: the loss or gradient was not finite on some rank for 3 steps in a row" in res.stdout
    assert not (tmp_path / "adapters").exists()


def test_adapters_saved_before_the_final_evaluation_survive_its_failure(tmp_path, tiny_model_dir):
    """The final evaluation runs out of memory on every rank: the adapters of the last step are
    already on disk, complete, with the config that launch/evaluate.py and launch/merge.py read."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    res = launch("tests/scripts/train_faults.py", [*ARGS, "max_steps=2", f"output_dir={tmp_path}"],
                 env={"FAULT_EVAL_OOM_STEP": "2"}, check=False, timeout=240)
    assert res.returncode != 0 and "injected: out of memory in the evaluation after step 2" in res.stdout
    assert not (tmp_path / "train_summary.json").exists()  # finish() never ran
    assert (tmp_path / "config.yaml").is_file()
    state = load_file(tmp_path / "adapters" / "shared" / "adapter_model.safetensors")
    assert len(state) == 28 and all(v.numel() > 0 for v in state.values())  # 2 layers x 7 modules x (A, B)
    assert all(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # trained, not the zero init
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, tmp_path / "adapters" / "shared")  # stock PEFT loads it


def test_dead_rank_makes_the_other_exit_within_timeout(tmp_path, tiny_model_dir):
    """Two simulated nodes (separate launchers, as on a cluster): node 1's rank dies mid-run; node 0's
    rank is stuck in a collective until dist_timeout_s, then exits non-zero instead of hanging."""
    t0 = time.time()
    with pytest.raises(AssertionError, match=r"exit "):
        launch_two_nodes("tests/scripts/train_faults.py", [*ARGS, "max_steps=50", "dist_timeout_s=20",
                                                           f"output_dir={tmp_path}"], timeout=240,
                         env={"FAULT_RANK": "1", "FAULT_DIE_STEP": "3"})
    assert time.time() - t0 < 200
