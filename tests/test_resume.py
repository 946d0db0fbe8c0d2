"""Checkpoints and exact resume: a run killed mid-way and resumed ends with the same adapters as an
uninterrupted run; incomplete checkpoints are never picked; SIGTERM checkpoints and exits 0."""
import json
import signal
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist import ROOT, kill_all, launch, start_srun_style
from mtl_scale import checkpoint
from mtl_scale.config import load_config, to_dict
from mtl_scale.errors import UserError

ARGS = ["configs/demo.yaml", "micro_batch_size=4", "sampling.tasks_per_step=3", "eval.every_steps=0",
        "eval.max_examples=2", "sharing=hybrid", "surgery.method=pcgrad", "lr=5e-3"] + \
       [f"tasks.{i}.{k}" for i in range(4) for k in ("num_examples=40", "eval_size=2")]


def _adapters(out):
    return {p.name: load_file(p / "adapter_model.safetensors") for p in sorted((out / "adapters").iterdir())}


@pytest.mark.dist
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, tiny_model_dir):
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch("tests/scripts/train_faults.py", [*ARGS, "max_steps=8", f"output_dir={full}"])
    killed = launch("tests/scripts/train_faults.py", [*ARGS, "max_steps=8", "checkpoint.every_steps=3",
                                                      f"output_dir={cut}"],
                    env={"FAULT_RANK": "1", "FAULT_DIE_STEP": "5"}, check=False, timeout=300)
    assert killed.returncode != 0 and not (cut / "adapters").exists()
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_00000003"]
    launch("tests/scripts/train_faults.py", [*ARGS, "max_steps=8", "checkpoint.every_steps=3", "resume=auto",
                                             f"output_dir={cut}"])
    a, b = _adapters(full), _adapters(cut)
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name} {key} differs after resume"
    # the resumed run's history is the uninterrupted one's: no duplicated or missing steps
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    losses = [json.loads(line)["loss"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert losses == [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_00000003", "step_00000006"]


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / "COMPLETE").write_text("step 4\n")
    (root / "step_00000008.partial").mkdir()             # killed while writing
    (root / "step_00000012").mkdir()                     # no COMPLETE marker
    (root / "step_00000016.partial").mkdir()             # killed between the marker and the rename
    (root / "step_00000016.partial" / "COMPLETE").write_text("step 16\n")
    assert checkpoint.latest_complete(tmp_path) == root / "step_00000004"
    assert checkpoint.latest_complete(tmp_path / "elsewhere") is None


def test_resume_from_a_different_config_is_refused(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}"])
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")
    (ckpt / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    ok = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}", "resume=auto", "max_steps=900"])
    assert checkpoint.resolve_resume(ok) == ckpt  # max_steps may change
    bad = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}", "resume=auto", "lr=0.1", "lora.r=4"])
    with pytest.raises(UserError, match="written by a different config; differing keys: lora, lr"):
        checkpoint.resolve_resume(bad)
    with pytest.raises(UserError, match="is not a complete mtl_scale checkpoint"):
        checkpoint.resolve_resume(load_config(ROOT / "configs/demo.yaml", [f"resume={tmp_path}"]))


@pytest.mark.dist
def test_sigterm_checkpoints_and_exits_zero(tmp_path, tiny_model_dir):
    """Pre-emption as SLURM does it: SIGTERM to every task (here: srun-style processes)."""
    out = tmp_path / "run"
    procs = start_srun_style(["--config", *ARGS, "max_steps=500", f"output_dir={out}"])
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "run did not start"
            time.sleep(0.5)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    ckpt = checkpoint.latest_complete(out)
    assert ckpt is not None and 3 <= int(ckpt.name.split("_")[1]) < 500
    assert not (out / "adapters").exists()  # not finished: only the checkpoint
