"""kdops.bench: the benchmark suite of kdops's losses against torch and other libraries.

    python -m kdops.bench --ops kd --shapes 4096x32000 --repeats 5    # or: kdops-bench ...
    python -m kdops.bench report                                       # benchmarks/results/README.md

:mod:`kdops.bench.cli` (command line and run loop), :mod:`kdops.bench.workloads` (ops, presets,
methods), :mod:`kdops.bench.measure` (timing, peak memory, machine), :mod:`kdops.bench.report`
(Markdown, plots, the performance page).
"""
from kdops.bench.cli import main

__all__ = ["main"]
