# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   -- the embedded demo training run
#   make test   -- the linter and the formatter's check (make lint), then the test suite
# and, beside them, make test-fast (the suite without the tests that start processes or train
# end to end: pytest -m "not integration"), make benchmark (tools/benchmark.py), make test-gpu (tests_gpu/, CUDA) and
# make gpu-check OUT=dir (the GPU acceptance: tools/gpu_check.py).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo lint test test-fast test-gpu gpu-check benchmark

setup: $(VENV)/.installed

# torch==2.13.0 first, so that megatron-core's resolution keeps it; which build pip installs is
# pip's configuration's (the local CPU wheel on this project's machines and in CI).
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) pretrain_gpt.py --config configs/demo.yaml

# ruff's checks and its formatter's (ruff.toml) on the code and the tests; make test runs them
# first. `$(PY) -m ruff format $(LINTED)` applies the formatting.
LINTED := remoe_patches tools tests tests_gpu scripts pretrain_gpt.py conftest.py setup.py
lint: setup
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

test: setup lint
	$(PY) -m pytest -q --durations=25 tests

# The unit tests alone (minutes): every test but those marked integration (pytest.ini).
test-fast: setup lint
	$(PY) -m pytest -q -m "not integration" tests

# On a machine with a CUDA GPU: the GPU tests (not part of CI, which has none).
test-gpu: setup
	$(PY) -m pytest -q tests_gpu

# On a GPU machine, with its own python3 and CUDA torch (no .venv, which holds the CPU wheel),
# in parts whose time limits add up to under 8 minutes each: PART=tests (tests_gpu), PART=train (the 182M
# launcher's save and resume), PART=bench (the benchmark at 182m and 469m); all three without
# PART. megatron-core and psutil come from .whl/ where they are not installed.
OUT ?= gpu_check
PART ?= all
gpu-check:
	python3 tools/gpu_check.py --part $(PART) --out $(OUT)

# The throughput table on this machine (tiny preset on CPU; pass e.g. ARGS="--preset 182m").
benchmark: setup
	$(PY) tools/benchmark.py $(ARGS)
