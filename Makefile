# The two set-up commands of the README:
#   make demo   the main job (builds kdops, then the end-to-end distillation demo, python -m kdops.demo)
#   make test   the whole test suite (builds kdops with its CPU and CUDA sources, then pytest)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is pinned: 2.13.0 resolves to the local CPU wheel here (an unpinned torch pulls CUDA builds)
DEPS := torch==2.13.0 triton==3.9.0 pybind11 ninja pytest numpy

.PHONY: install demo test bench lint aot-check gpu-check

install:
	$(PIP) install -q $(DEPS)
	$(PIP) install -q --no-build-isolation -e .
	$(PYTHON) -c "import kdops; [print(f'{k:>7}: {v.available!s:<5} {v.reason}') for k, v in kdops.available_backends().items()]"

demo: install
	$(PIP) install -q matplotlib
	$(PYTHON) -m kdops.demo

bench: install
	$(PYTHON) benchmarks/bench_kd.py

# optional extras whose integrations the suite tests (transformers Trainer, TRL's trainers' losses, plots);
# trl pinned: kdops.integrations.trl replaces functions of that release (torch stays pinned alongside);
# pytest-xdist runs the suite in one process per core (most of it is the single-threaded Triton interpreter)
TEST_EXTRAS := transformers accelerate matplotlib hypothesis trl==1.16.0 pytest-xdist

# the linter (config in pyproject.toml): .ci/run runs `make lint` before `make test`
LINT_DEPS := ruff

lint:
	$(PIP) install -q $(LINT_DEPS)
	$(PYTHON) -m ruff check .

test: install
	$(PIP) install -q $(TEST_EXTRAS) $(LINT_DEPS) torch==2.13.0
	$(PYTHON) -m pytest tests -q -ra -n auto

# make aot-check: every Triton specialisation the launchers produce, compiled for sm_80/90/100 with
# the pinned Triton and with Triton 3.6 (the GPU machines' version; a virtual environment made here
# on first use, torch pinned to the local CPU wheel), then the CUDA C++ kernels with nvcc -Xptxas -v for
# sm_80/90/100 (all of them in every mode: about 4 minutes on 2 cores).
# AOT_FLAGS=--quick: the CI subset; AOT_FLAGS="--shard I/N": every N-th specialisation from the I-th (the
# full matrix: 4851 compiles, about 80 minutes on 2 cores: split it over machines); rows are cached in ~/.cache/kdops/aot-rows
# under Triton's own cache key (a re-run compiles what changed; --no-cache: everything).
# No GPU needed; non-zero exit status on any failure.
TRITON36_VENV ?= $(HOME)/.cache/kdops/venv-triton36
AOT_FLAGS ?=
AOT_DATE := $(shell date +%F)

$(TRITON36_VENV)/bin/python:
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/pip install -q torch==2.13.0 triton==3.6.0 numpy

aot-check: $(TRITON36_VENV)/bin/python
	nice $(PYTHON) tools/aot_check.py --python $(TRITON36_VENV)/bin/python $(AOT_FLAGS)
	nice $(PYTHON) tools/cuda_resource_check.py benchmarks/results/cuda-resources-$(AOT_DATE).json

# make gpu-check: the one prepared command for a lent GPU (builds kdops, CUDA tests, GPU benchmark
# presets; JSON under benchmarks/results/); GPU_CHECK_FLAGS=--dry-run runs its plumbing on CPU.
GPU_CHECK_FLAGS ?=
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_FLAGS)
