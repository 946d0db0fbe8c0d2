"""Test driver: shared_fs's two checks on a plain gloo group of ranks (no model, no DeepSpeed).

    RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python shared_fs_check.py OUTPUT_DIR VIEW

VIEW is this rank's resume view: ``none``, ``error:<message>`` or a checkpoint path. Prints
``agreed: <path or None>``, or the UserError both checks raise (exit 2).
"""
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from mtl_scale import shared_fs
from mtl_scale.errors import UserError


def main():
    out, view = sys.argv[1], sys.argv[2]
    local = None if view == "none" else UserError(view[6:]) if view.startswith("error:") else Path(view)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        shared_fs.check_output_dir(out, rank, world, wait_s=1.0)
        print("agreed:", shared_fs.agree_on_resume("auto", local, rank, world), flush=True)
    except UserError as e:
        print(f"mtl_scale: error: {e}", flush=True)
        sys.exit(2)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
