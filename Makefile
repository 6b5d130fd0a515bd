# make demo: set up .venv if needed, then run the main job on the built-in synthetic default.
# make test: same set-up, then the test suite.
# make gpu-check: same set-up, then benchmarks/gpu_check.py (see README: Set up).
# A user with a GPU can install their own torch into .venv first; the set-up keeps it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel: plain 'torch' from PyPI is a multi-GB CUDA build. Where pip cannot find the
# CPU wheel locally, add: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# the test suite covers nlbfab-all's Ray backend on a local Ray instance, so set-up installs it
EXTRAS ?= test,ray
STAMP := $(VENV)/.nlbfab-installed

.PHONY: setup demo test gpu-check clean-data

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml nlb_tools/requirements.txt nlb_tools/nlb-tools.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --no-deps -r nlb_tools/nlb-tools.txt
	$(PIP) install -r nlb_tools/requirements.txt
	$(PIP) install -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: setup
	bin/nlbfab-demo

test: setup
	$(PY) -m pytest -q --durations=15

# on a GPU machine: the GRU on cuDNN, training in each precision, DDP, nlbfab-all, throughput
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean-data:
	rm -rf data runs
