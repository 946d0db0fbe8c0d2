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
        _shutdown_process_group()
    except UserError as e:
        # Every rank exits; the DeepSpeed launcher then stops the rest, so nothing hangs.
        print(f"mtl_scale: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _shutdown_process_group() -> None:
    """Leave the process group together: exiting with it alive lets gloo's threads abort the
    interpreter ("terminate called without an active exception") while a peer still talks to it."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
