# The two set-up commands of the README:
#   make demo   the main job (builds kdops, then the end-to-end distillation demo, python -m kdops.demo)
#   make test   the whole test suite (builds kdops with its CPU and CUDA sources, then pytest)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is pinned: 2.13.0 resolves to the local CPU wheel here (an unpinned torch pulls CUDA builds)
DEPS := torch==2.13.0 triton==3.9.0 pybind11 ninja pytest numpy

.PHONY: install demo test bench lint aot-triton aot-check aot-rows gpu-check

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

# make aot-check: every Triton specialisation the launchers produce (the full matrix), checked for
# sm_80/90/100 with the pinned Triton and with Triton 3.6 (the GPU machines' version; a virtual
# environment made here on first use, torch pinned to the local CPU wheel), then the CUDA C++ kernels
# with nvcc -Xptxas -v for sm_80/90/100 (all of them in every mode: 4-14 minutes on 2 cores).
# A row of $(AOT_ROWS) (the committed full run) stands for the compile of the same Triton cache key
# (kernel sources, signature, constexprs, options, target, Triton and ptxas versions); the rest are
# compiled (and cached in ~/.cache/kdops/aot-rows); the checks run on every row.
# make aot-rows: the full matrix re-recorded in $(AOT_ROWS), compiling what the file lacks (after a
# kernel change: commit the file with it); AOT_FLAGS=--verify compiles every row from scratch
# (about 80 minutes on 2 cores) and fails where one differs from the file.
# AOT_FLAGS: more flags (--quick: the CI subset; --verify: compile the recorded rows too and fail where
# they differ; --verify-quick I/N, --verify-shard I/N: the same for a sample; --shard I/N; --no-cache;
# --max-compiles N). No GPU needed; non-zero exit status on any failure.
TRITON36_VENV ?= $(HOME)/.cache/kdops/venv-triton36
AOT_ROWS ?= benchmarks/results/aot-rows.json
AOT_FLAGS ?=
AOT_DATE := $(shell date +%F)
AOT_TRITON = nice $(PYTHON) tools/aot_check.py --python $(TRITON36_VENV)/bin/python

$(TRITON36_VENV)/bin/python:
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/pip install -q torch==2.13.0 triton==3.6.0 numpy

aot-triton: $(TRITON36_VENV)/bin/python
	$(AOT_TRITON) --recorded $(AOT_ROWS) $(AOT_FLAGS)

aot-check: aot-triton
	nice $(PYTHON) tools/cuda_resource_check.py benchmarks/results/cuda-resources-$(AOT_DATE).json

aot-rows: $(TRITON36_VENV)/bin/python
	$(AOT_TRITON) --no-cache --recorded $(AOT_ROWS) --record $(AOT_ROWS) $(AOT_FLAGS)

# make gpu-check: the one prepared command for a lent GPU (builds kdops, CUDA tests, GPU benchmark
# presets; JSON under benchmarks/results/); GPU_CHECK_FLAGS=--dry-run runs its plumbing on CPU.
GPU_CHECK_FLAGS ?=
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_FLAGS)
