"""shared_fs's checks on 2 plain gloo ranks: an output_dir that is not the same directory for every
rank is refused on every rank, and ranks that found different checkpoints to resume from all refuse."""
import os
import socket
import subprocess
import sys

import pytest

from dist import ROOT, kill_all
from mtl_scale.process_group import free_port

pytestmark = pytest.mark.dist
HOST = socket.gethostname()


def _two_ranks(dirs, views, timeout=60):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "tests/scripts/shared_fs_check.py", str(d), v], cwd=ROOT,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for r, (d, v) in enumerate(zip(dirs, views))]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        kill_all(procs)
    return [(p.returncode, o) for p, o in zip(procs, outs)]


def test_separate_output_dirs_are_refused_on_every_rank(tmp_path):
    a, b = tmp_path / "node0", tmp_path / "node1"
    for (rc, out), own in zip(_two_ranks([a, b], ["none", "none"]), [a, b]):  # each rank names its own key
        assert rc == 2, out
        assert (f"mtl_scale: error: output_dir='{own}' is not shared by all ranks: rank 1 (host {HOST}) cannot see the "
                f"file rank 0 (host {HOST}) wrote there.") in out, out
        assert "put output_dir on a filesystem shared by all nodes (NFS, Lustre, GPFS, ...)" in out, out
        assert "Traceback" not in out, out
    assert list(a.iterdir()) == []  # the probe is gone; nothing else was written
    assert not b.exists()


def test_a_shared_output_dir_passes_and_keeps_no_probe(tmp_path):
    out_dir = tmp_path / "shared"
    ckpt = out_dir / "checkpoints" / "step_00000002"
    for rc, out in _two_ranks([out_dir, out_dir], [str(ckpt), str(ckpt)]):
        assert rc == 0, out
        assert f"agreed: {ckpt}" in out, out
    assert list(out_dir.iterdir()) == []


def test_ranks_that_found_different_checkpoints_all_refuse(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    for rc, out in _two_ranks([tmp_path, tmp_path], [str(ckpt), "none"]):
        assert rc == 2, out
        assert (f"mtl_scale: error: resume=auto: the ranks do not agree on the checkpoint to resume from; "
                f"rank 0 (host {HOST}): {ckpt}; rank 1 (host {HOST}): no complete checkpoint (a fresh start). "
                "Every rank must resume from the same complete checkpoint") in out, out


def test_a_resume_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    results = _two_ranks([tmp_path, tmp_path], ["none", "error:resume: bad checkpoint"])
    for rc, out in results:
        assert rc == 2, out
        assert "rank 1 (host " + HOST + "): error: resume: bad checkpoint" in out, out
    # the same error on every rank is raised as it is
    for rc, out in _two_ranks([tmp_path, tmp_path], ["error:resume: bad checkpoint"] * 2):
        assert rc == 2 and "mtl_scale: error: resume: bad checkpoint\n" in out, out
