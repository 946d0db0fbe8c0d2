# make demo   — on a fresh machine: set up, build the embedded tiny model, train 4 tasks on 2 ranks, evaluate, merge
# make test   — on a fresh machine: set up, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 29500
NUM_RANKS ?= 2
export MTL_SCALE_CACHE ?= $(CURDIR)/.cache/mtl_scale

.PHONY: setup tiny-model demo train evaluate merge test test-fast clean

# The CPU torch wheel first: a bare torch requirement would pull a multi-GB CUDA build.
# On a GPU machine, install the torch build you want first and `make setup` keeps it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

tiny-model: setup  # checks the committed embedded base (rebuild: $(PY) -m mtl_scale.base_model)
	$(PY) -m mtl_scale.model

train: tiny-model
	$(VENV)/bin/deepspeed --num_gpus $(NUM_RANKS) --master_port $(PORT) launch/train.py --config configs/demo.yaml

evaluate: setup
	$(PY) launch/evaluate.py --config configs/demo.yaml

merge: setup
	$(PY) launch/merge.py runs/demo

demo: train evaluate merge

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not dist" tests

clean:
	rm -rf runs .pytest_cache
