"""Benchmark of kdops.distill_loss against torch: the ``kd`` preset of ``python -m kdops.bench``.

    python benchmarks/bench_kd.py                       # = python -m kdops.bench --ops kd
    python benchmarks/bench_kd.py --shapes 4096x32000 --dtypes float32 --repeats 5

Takes every option of ``python -m kdops.bench`` (see ``--help``). Also re-exports the
measurement helpers of :mod:`kdops.bench.measure` for the scripts that import them from here.
"""
from __future__ import annotations

import sys

from kdops.bench import main
from kdops.bench.measure import DTYPES, MiB, copy_bandwidth, machine_info, median_seconds, peak_extra_bytes
from kdops.bench.workloads import torch_eager_kd as torch_eager

__all__ = ["DTYPES", "MiB", "copy_bandwidth", "machine_info", "median_seconds", "peak_extra_bytes", "torch_eager"]

if __name__ == "__main__":
    sys.exit(main(["--ops", "kd", *sys.argv[1:]]))
