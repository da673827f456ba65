"""Helpers shared by the demo's tracks: device choice, seeding, a progress bar, statistics."""
from __future__ import annotations

import math
import sys
import time
from typing import Sequence

import torch


def pick_device(requested: str) -> torch.device:
    """``"auto"``: CUDA when present, else CPU; otherwise the named device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested!r} asked for, but torch sees no CUDA device")
    return device


def generator(seed: int, device: torch.device = torch.device("cpu")) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


class Progress:
    """A one-line progress bar on stderr: ``label [#####.....] 12/40 2.3s loss 0.51``."""

    def __init__(self, label: str, total: int, width: int = 24) -> None:
        self.label, self.total, self.width = label, max(total, 1), width
        self.start = time.perf_counter()
        self.done = 0

    def update(self, step: int = 1, info: str = "") -> None:
        self.done = min(self.done + step, self.total)
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"\r  {self.label:<28} [{bar}] {self.done}/{self.total} {elapsed:6.1f}s {info}"
        sys.stderr.write(line.ljust(100))
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

