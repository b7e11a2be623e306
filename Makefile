# Set-up and everyday commands. `make demo` and `make test` are the two commands the
# README promises work on a fresh machine; both create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of this torch is what the Makefile installs; override on other machines
# (e.g. `make setup TORCH_VERSION=2.8.0`). The pin is passed as a pip constraint so that
# resolving timm/torchvision/deepspeed can never replace it with a CUDA build.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo cost compare compare-mini bench ratio-dial gpu-wheels gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml Makefile
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt "setuptools>=61" wheel "torch==$(TORCH_VERSION)"
	# --no-build-isolation: deepspeed's setup.py imports torch; an isolated build
	# environment would download a second (CUDA) torch just to build it.
	$(BIN)/pip install -q -c $(VENV)/constraints.txt --no-build-isolation -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The venv's bin first on PATH, as in an activated venv: the processes the tests launch
# (deepspeed, torchrun, ninja for an op DeepSpeed builds) are this environment's.
TEST_ENV := PATH="$(abspath $(BIN)):$$PATH"

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow and not distributed" $(PYTEST_ARGS)

demo: setup
	$(BIN)/marscale demo

cost: setup
	$(BIN)/marscale cost

# Counted cost beside steps measured on this machine's engine (docs/benchmarks.md).
compare: setup
	$(BIN)/marscale compare --out runs/compare

# The MAR experiment in miniature (docs/benchmarks.md): a larger MAR model at 50% mask vs a
# smaller full-token model (and the larger one in full), and the paper's direction (the
# smaller one masked vs the larger one in full), same recipe and steps, 3 seeds each, on
# `marscale-shards synth --task motion`; top-1 beside counted and measured cost. About 13
# minutes on an idle 2-core CPU (the first three rows took 36 on a shared one).
compare-mini: setup
	$(BIN)/python benchmarks/compare_mini.py --out runs/compare_mini

# CPU benchmarks (docs/benchmarks.md): model time vs counted FLOPs, then the loader.
bench: setup
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_loader.py --videos 24 --repeats 3 --clips 12 --gpu-clips-per-s 200

# Per-clip mask ratios vs a fixed 50% on compare-mini's motion task: three seeds of each
# training, each scored at 4 evaluation ratios (docs/benchmarks.md). 14 minutes on a
# shared 2-core CPU.
ratio-dial: setup
	$(BIN)/python benchmarks/ratio_dial.py

# The GPU check (benchmarks/gpu_check.py, README "First run on a GPU"). gpu-wheels, where
# there is network: the packages a bare GPU image lacks, as wheels for its Python, in
# wheels/. gpu-check, on the GPU machine: this checkout's .venv when there is one, else
# the machine's python3 (its CUDA PyTorch) with wheels/ installed beside it.
GPU_CHECK_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_ARGS ?=

gpu-wheels: setup
	$(BIN)/python benchmarks/gpu_check.py wheels --out wheels

gpu-check:
	$(GPU_CHECK_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
