"""Launch real DeepSpeed ranks from tests: a free port per launch, a timeout on the whole process
group, the children's output printed when they fail, nothing left running afterwards."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from mtl_scale.process_group import deepspeed_command, free_port, run_group

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], timeout: float, env: dict | None) -> subprocess.CompletedProcess:
    return run_group(cmd, timeout, env, cwd=ROOT)


def launch(script: str, args: list[str], nprocs: int = 2, timeout: float = 600, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus nprocs script args`` (CPU ranks here)."""
    cmd = deepspeed_command(nprocs, script, args)
    res = _run(cmd, timeout, env)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}: {' '.join(cmd)}\n--- output ---\n{res.stdout[-20000:]}")
    return res


def start_srun_style(args: list[str], nprocs: int = 2) -> list[subprocess.Popen]:
    """``python launch/train.py args`` once per rank with the variables srun sets (no launcher)."""
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nprocs), "SLURM_LOCALID": str(rank),
               "SLURM_NTASKS_PER_NODE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONUNBUFFERED": "1"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
        procs.append(subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch_two_nodes(script: str, args: list[str], timeout: float = 600, env: dict | None = None,
                     node_args: list[list[str]] | None = None, node_env: list[dict] | None = None,
                     check: bool = True) -> list[subprocess.CompletedProcess]:
    """Two simulated nodes of one rank each, started the way the multi-node runner starts each host.
    ``node_args[n]`` / ``node_env[n]`` are added for node n only (e.g. a per-node output_dir: the
    stand-in for node-local disks at the same path). A launch past ``timeout`` raises AssertionError."""
    world = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", script, *args,
               *(node_args[node] if node_args else [])]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True,
                                      env={**os.environ, **(env or {}), **(node_env[node] if node_env else {}),
                                           "PYTHONUNBUFFERED": "1"}))
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"two-node launch timed out after {timeout}s")
    finally:
        kill_all(procs)
    for r in results if check else []:
        if r.returncode != 0:
            raise AssertionError(f"exit {r.returncode}: {' '.join(r.args)}\n{r.stdout[-20000:]}")
    return results
