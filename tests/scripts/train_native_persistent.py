"""Test driver (run under the deepspeed launcher): the real trainer with ZeRO-3's own handling of
persistent parameters, i.e. without ``zero3_adapters.keep_persistent_gathered``: the reference that
tests/test_zero3_adapters.py compares the kept path with."""
import sys

from mtl_scale import zero3_adapters
from mtl_scale.cli import run_entry
from mtl_scale.config import load_config
from mtl_scale.trainer import train


def main():
    zero3_adapters.keep_persistent_gathered = lambda optimizer: None  # DeepSpeed frees and re-gathers them
    train(load_config(sys.argv[1], sys.argv[2:]))


if __name__ == "__main__":
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    run_entry(main)
