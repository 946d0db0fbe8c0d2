"""Child processes that must not outlive their caller: a free port for a launch, and a command run in a
session of its own under a timeout, its whole process group (the DeepSpeed launcher's ranks too) killed
afterwards whatever happened. Used by the trainer (the port of a world of one), the benchmarks and the
tests' DeepSpeed launches."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


class LaunchTimeout(RuntimeError):
    """The command ran past its timeout (its process group is killed); carries the output's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(nprocs: int, script: str, args: list[str]) -> list[str]:
    """``deepspeed --num_gpus nprocs --master_port <free> script args``, the launcher run as this
    interpreter's module: works wherever deepspeed is importable (a venv, or a --target install
    without its scripts on PATH)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port",
            str(free_port()), script, *args]


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
