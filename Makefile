# The two set-up commands of the README:
#   make demo   the main job (builds kdops, then the end-to-end distillation demo, python -m kdops.demo)
#   make test   the whole test suite (builds kdops with its CPU and CUDA sources, then pytest)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is pinned: 2.13.0 resolves to the local CPU wheel here (an unpinned torch pulls CUDA builds)
DEPS := torch==2.13.0 triton==3.9.0 pybind11 ninja pytest numpy

.PHONY: install demo test bench

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
# trl pinned: kdops.integrations.trl replaces functions of that release (torch stays pinned alongside)
TEST_EXTRAS := transformers accelerate matplotlib trl==1.16.0

test: install
	$(PIP) install -q $(TEST_EXTRAS) torch==2.13.0
	$(PYTHON) -m pytest tests -q -ra
