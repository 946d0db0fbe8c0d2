"""Multi-node launch paths on one machine: two simulated nodes (the per-host launcher the multi-node
runner starts) and srun-style SLURM variables give the same per-step losses as 2 local ranks; an
output_dir on node-local disks is refused on every node."""
import json
import time

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


def test_node_local_output_dirs_are_refused_on_every_node(tmp_path, tiny_model_dir):
    """Node-local disks, simulated: node 0 gets output_dir=A, node 1 output_dir=B. Unchecked, the first run
    "succeeds" with node 1's checkpoint parts in a step_N.partial nobody renames, and the resume=auto
    restart starts node 0 at the checkpoint and node 1 at step 0, which hangs until dist_timeout_s.
    Both launches must instead stop on both nodes at start-up, before any checkpoint, with the reason."""
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    args = ["--config", "configs/demo.yaml", *ARGS, "checkpoint.every_steps=2", "dist_timeout_s=60"]
    launches = []
    for extra in ([], ["resume=auto"]):  # a first run, then the restart after a failure
        t0 = time.time()
        results = launch_two_nodes("launch/train.py", args + extra, node_args=[[f"output_dir={d}"] for d in dirs],
                                   check=False, timeout=180)
        launches.append((results, time.time() - t0))
    for results, elapsed in launches:
        for d, res in zip(dirs, results):
            assert res.returncode != 0, res.stdout[-3000:]
            assert (f"mtl_scale: error: output_dir='{d}' is not shared by all ranks: rank 1 (host "
                    in res.stdout), res.stdout[-3000:]
            assert "put output_dir on a filesystem shared by all nodes" in res.stdout, res.stdout[-3000:]
            assert "Traceback" not in res.stdout, res.stdout[-3000:]
        # refused at start-up (~20 s here), not by a collective timing out after dist_timeout_s
        assert elapsed < 60, elapsed
    assert [p.name for p in dirs[0].iterdir()] == []  # no probe left, no metrics, no checkpoint
    assert not dirs[1].exists()
