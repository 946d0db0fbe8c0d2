"""Shared plumbing of the launch/ entry points: logging, and user errors printed without a traceback."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

from mtl_scale.errors import UserError


def run_entry(main: Callable[[], object]) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # DeepSpeed calls torch.distributed APIs that torch deprecates; the warning is not ours to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    try:
        main()
    except UserError as e:
        # Every rank exits; the DeepSpeed launcher then stops the rest, so nothing hangs.
        print(f"mtl_scale: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
