# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   -- the embedded demo training run
#   make test   -- the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test

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
