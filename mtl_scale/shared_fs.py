"""Every rank must see the same ``output_dir``: checkpoints are written by all ranks into one
``step_N.partial`` that global rank 0 alone marks and renames, and ``resume=auto`` picks the newest
complete one. On node-local disks the other nodes' parts land in a ``.partial`` that is never
renamed, and on restart the nodes resume from different steps and hang in the first collective.
Both checks run right after the process group starts, before anything is written or resumed:

    check_output_dir(output_dir, rank, world)            # rank 0 writes a probe; every rank reads it
    agree_on_resume(resume, local_view, rank, world)      # one checkpoint for all ranks, or an error on all
"""
from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

from mtl_scale.errors import UserError

PROBE_PREFIX = ".mtl_scale_probe."
PROBE_WAIT_S = 5.0
"""How long a rank retries before it calls rank 0's probe invisible: network filesystems (NFS
attribute caching) may show a file another host just wrote a moment later."""


def _gather(obj, world: int) -> list:
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _ranks(ranks: list[int], hosts: list[str]) -> str:
    """'ranks 1, 3 (hosts a, b)': who, with the machines they run on."""
    names = sorted({hosts[r] for r in ranks})
    return (f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
            f"(host{'s' if len(names) > 1 else ''} {', '.join(names)})")


def _sees(probe: Path, token: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if probe.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check_output_dir(output_dir: str | Path, rank: int, world: int, wait_s: float = PROBE_WAIT_S) -> None:
    """Collective. Rank 0 writes a file with a random token into ``output_dir``; every rank must read
    that token there. Otherwise every rank raises the same UserError (so every node exits, none hangs)."""
    if world == 1:
        return
    import torch.distributed as dist

    out = Path(output_dir)
    box = [None, None]  # [token, rank 0's error]
    if rank == 0:
        token = secrets.token_hex(16)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{PROBE_PREFIX}{token}").write_text(token)
            box = [token, None]
        except OSError as e:
            box = [None, f"output_dir={str(output_dir)!r}: rank 0 cannot write there: {e}"]
    dist.broadcast_object_list(box, src=0)
    token, error = box
    if error:
        raise UserError(error)
    probe = out / f"{PROBE_PREFIX}{token}"
    views = _gather((socket.gethostname(), _sees(probe, token, wait_s)), world)  # also: every rank has looked
    if rank == 0:
        probe.unlink(missing_ok=True)
    hosts = [h for h, _ in views]
    blind = [r for r, (_, seen) in enumerate(views) if not seen]
    if blind:
        raise UserError(
            f"output_dir={str(output_dir)!r} is not shared by all ranks: {_ranks(blind, hosts)} cannot see the file "
            f"{_ranks([0], hosts)} wrote there. Checkpoints, resume and the final adapters need one output_dir "
            "that every node sees: put output_dir on a filesystem shared by all nodes (NFS, Lustre, GPFS, ...); "
            "node-local disks are not supported")


def agree_on_resume(resume: str, local_view: Path | None | UserError, rank: int, world: int) -> Path | None:
    """Collective. ``local_view`` is what this rank's ``checkpoint.resolve_resume`` found (a checkpoint,
    None for a fresh start, or the UserError it raised). Returns the checkpoint every rank resumes from;
    raises the same UserError on every rank if any rank failed or the ranks saw different checkpoints."""
    if isinstance(local_view, UserError):
        view = ("error", str(local_view))
    else:
        view = ("checkpoint", None if local_view is None else str(local_view))
    views = _gather((socket.gethostname(), view), world) if world > 1 else [(socket.gethostname(), view)]
    hosts = [h for h, _ in views]
    distinct = list(dict.fromkeys(v for _, v in views))  # in rank order of first appearance
    if len(distinct) == 1:
        if view[0] == "error":
            raise local_view
        return local_view

    def describe(v) -> str:
        kind, what = v
        if kind == "error":
            return f"error: {what}"
        return what if what is not None else "no complete checkpoint (a fresh start)"

    seen = "; ".join(f"{_ranks([r for r, (_, v) in enumerate(views) if v == d], hosts)}: {describe(d)}"
                     for d in distinct)
    raise UserError(
        f"resume={resume}: the ranks do not agree on the checkpoint to resume from; {seen}. Every rank must "
        "resume from the same complete checkpoint: output_dir must be on a filesystem shared by all nodes, and no "
        "other run may write checkpoints there meanwhile")
