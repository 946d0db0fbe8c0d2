"""Process groups: the one a run's ranks join (``init_distributed``: torchrun/deepspeed/srun environments,
gloo on CPU, NCCL on GPU), and child processes that must not outlive their caller (a free port for a
launch, a command run in a session of its own under a timeout, its whole process group, the DeepSpeed
launcher's ranks too, killed afterwards whatever happened). Used by the trainer, the benchmarks and the
tests' DeepSpeed launches."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch

from mtl_scale.errors import UserError


class LaunchTimeout(RuntimeError):
    """The command ran past its timeout (its process group is killed); carries the output's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(nprocs: int, script: str, args: list[str], module: bool = False) -> list[str]:
    """``deepspeed --num_gpus nprocs --master_port <free> script args``, the launcher run as this
    interpreter's module: works wherever deepspeed is importable (a venv, or a --target install
    without its scripts on PATH). ``module=True``: ``script`` is a module name, each rank runs
    ``python -m script`` (the launcher's ``--module``), importable from the working directory."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port",
            str(free_port()), *(["--module"] if module else []), script, *args]


def run_group(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path | str | None = None,
              log=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion in a new session; its output (stdout and stderr together) is returned, or
    written to the open file ``log``. On timeout the group is killed and LaunchTimeout raised."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise LaunchTimeout(f"timed out after {timeout:.0f}s: {' '.join(map(str, cmd))}"
                            + (f"\n--- output ---\n{out[-20000:]}" if out else "")) from None
    finally:
        try:  # the launcher's children too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out or "", "")


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Join the process group the launcher set up (or make a one-rank group for ``python train.py``)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun, one task per GPU
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ["SLURM_LOCALID"],
                          LOCAL_WORLD_SIZE=os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError("under srun, export MASTER_ADDR (the first node's hostname) and MASTER_PORT; "
                            "see launch/slurm_srun.sbatch")
    if "RANK" not in os.environ:  # started without a launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    on_gpu = get_accelerator().device_name() == "cuda"
    if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine share its cores; oversubscription makes every rank slower.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not on_gpu:
        # DeepSpeed builds its shared-memory op (a JIT C++ compile) for every CPU world, yet only its
        # inference_all_reduce uses it. A fresh machine then spends minutes compiling inside the first launch, a
        # launch killed mid-build leaves torch's lock file behind and every later launch waits on it forever, and
        # each world leaves its buffers in /dev/shm. Training needs none of it: gloo does the reductions.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    if on_gpu:
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
