"""Benchmark of the relation-based losses (SP, RKD distance, RKD angle) against torch: the
``affinity`` preset of ``python -m kdops.bench``.

    python benchmarks/bench_affinity.py                 # = python -m kdops.bench --ops affinity
    python benchmarks/bench_affinity.py --shapes rkd_angle:512x128 --repeats 3

Takes every option of ``python -m kdops.bench`` (see ``--help``).
"""
from __future__ import annotations

import sys

from kdops.bench import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "affinity", *sys.argv[1:]]))
