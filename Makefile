# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   -- the embedded demo training run
#   make test   -- the test suite
# and, beside them, make benchmark (tools/benchmark.py) and make test-gpu (tests_gpu/, CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-gpu benchmark

setup: $(VENV)/.installed

# pip takes torch==2.13.0 from the local CPU wheel; installing it first keeps any later
# resolution from reaching for a CUDA build.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(PY) pretrain_gpt.py --config configs/demo.yaml

test: setup
	$(PY) -m pytest -q tests

# On a machine with a CUDA GPU: the GPU tests (not part of CI, which has none).
test-gpu: setup
	$(PY) -m pytest -q tests_gpu

# The throughput table on this machine (tiny preset on CPU; pass e.g. ARGS="--preset 182m").
benchmark: setup
	$(PY) tools/benchmark.py $(ARGS)
