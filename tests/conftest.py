import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One cache for the built tiny model, shared by the test process and the ranks it launches.
os.environ.setdefault("MTL_SCALE_CACHE", str(ROOT / ".cache" / "mtl_scale"))
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from mtl_scale.model import ensure_tiny_model
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from mtl_scale.model import load_tokenizer
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def gsm8k_path() -> Path:
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} not present (it ships in ../shared/data beside the checkout)")
    return GSM8K
