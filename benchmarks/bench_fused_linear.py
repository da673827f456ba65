"""Benchmark of kdops.fused_linear_distill_loss (lm-head GEMMs + distillation, no [N, V] logits):
the ``fused_linear`` preset of ``python -m kdops.bench``, with the issue's CPU target (kdops-cpu:
peak <= 1/8 and time <= 1.3x of torch-eager, which materialises the logits) checked on CPU.

    python benchmarks/bench_fused_linear.py             # = python -m kdops.bench --ops fused_linear
    python benchmarks/bench_fused_linear.py --shapes 4096x1024x32000 --repeats 3

Takes every option of ``python -m kdops.bench`` (see ``--help``).
"""
from __future__ import annotations

import sys

from kdops.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "fused_linear", *sys.argv[1:]]))
