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

# optional extras whose integrations the suite tests (transformers Trainer example, demo/bench plots)
TEST_EXTRAS := transformers accelerate matplotlib

test: install
	$(PIP) install -q $(TEST_EXTRAS)
	$(PYTHON) -m pytest tests -q -ra
