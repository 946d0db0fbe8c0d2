"""Multi-node launch paths on one machine: two simulated nodes (the per-host launcher the multi-node
runner starts) and srun-style SLURM variables give the same per-step losses as 2 local ranks."""
import json

import pytest

from dist import kill_all, launch, launch_two_nodes, start_srun_style

pytestmark = pytest.mark.dist

ARGS = ["max_steps=4", "micro_batch_size=4", "sampling.tasks_per_step=2", "eval.every_steps=0", "eval.max_examples=2",
        "sharing=soft"] + [f"tasks.{i}.{k}" for i in range(4) for k in ("num_examples=40", "eval_size=2")]


def _losses(out):
    return [{k: v for k, v in json.loads(line).items() if k.startswith("loss")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _srun_style(out, timeout=300):
    procs = start_srun_style(["--config", "configs/demo.yaml", *ARGS, f"output_dir={out}"])
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        kill_all(procs)
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-5000:]


def test_two_nodes_and_srun_match_local_ranks(tmp_path, tiny_model_dir):
    launch("launch/train.py", ["--config", "configs/demo.yaml", *ARGS, f"output_dir={tmp_path / 'local'}"])
    launch_two_nodes("launch/train.py", ["--config", "configs/demo.yaml", *ARGS, f"output_dir={tmp_path / 'nodes'}"])
    _srun_style(tmp_path / "srun")
    local = _losses(tmp_path / "local")
    assert len(local) == 4
    for other in ("nodes", "srun"):
        got = _losses(tmp_path / other)
        assert [sorted(r) for r in got] == [sorted(r) for r in local]
        for a, b in zip(got, local):
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (other, k)
