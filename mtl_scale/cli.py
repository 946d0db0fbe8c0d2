"""Shared plumbing of the launch/ entry points: logging, and user errors printed without a traceback."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

from mtl_scale.errors import UserError


def run_entry(main: Callable[[], object]) -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # DeepSpeed calls torch.distributed APIs that torch deprecates; the warning is not ours to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    try:
        main()
        if _shutdown_process_group():
            # Everything is written and the group is gone; skip the interpreter's finalization, where gloo's
            # worker threads can still abort the process ("terminate called without an active exception",
            # exit code 250, seen about once in a few hundred 2-rank CPU launches after the run had finished;
            # pytorch/pytorch#179291 describes the teardown race).
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except UserError as e:
        # Every rank exits; the DeepSpeed launcher then stops the rest, so nothing hangs.
        print(f"mtl_scale: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _shutdown_process_group() -> bool:
    """Leave the process group together: exiting with it alive lets gloo's threads abort the
    interpreter ("terminate called without an active exception") while a peer still talks to it.
    True if there was a group to leave."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        return True
    return False
