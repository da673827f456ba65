"""The native modules ``kdops._C`` (OpenMP, CPU tensors) and ``kdops._C_cuda`` (CUDA tensors):
loading, status, and the one launch helper. The modules take data pointers, not tensors, so they
do not link libtorch; the family launchers beside this file allocate the outputs and pass the
pointers, strides and codes.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[Optional[ModuleType], str]:
    """The module kdops.<name>, or None and why it cannot be imported."""
    try:
        return importlib.import_module(f"kdops.{name}"), ""
    except ImportError as e:
        return None, (
            f"the native module kdops.{name} is not built or cannot be loaded ({e}); "
            "reinstall kdops with `pip install -e . --no-build-isolation` (needs cmake and a "
            "C++17 compiler, and nvcc for the CUDA module)"
        )


def cpu_status() -> tuple[bool, str]:
    """(whether the CPU kernels can run, why not / what they are)."""
    module, why_not = load("_C")
    if module is None:
        return False, why_not
    return True, f"kdops._C, OpenMP with {module.num_threads()} threads"


def cuda_status() -> tuple[bool, str]:
    """(whether the CUDA kernels can run: kdops._C_cuda importable and a GPU visible, why not)."""
    module, why_not = load("_C_cuda")
    if module is None:
        return False, why_not
    if not torch.cuda.is_available():
        return False, "kdops._C_cuda is built but no CUDA device is available"
    return True, f"kdops._C_cuda on {torch.cuda.get_device_name()}"


def call(name: str, device: torch.device, *args, **kwargs) -> None:
    """Runs ``kdops._C.<name>(*args)``, or for CUDA tensors ``kdops._C_cuda.<name>(*args, stream)``
    on ``device`` and its current stream."""
    module, why_not = load("_C_cuda" if device.type == "cuda" else "_C")
    if module is None:
        raise RuntimeError(why_not)
    if device.type == "cuda":
        with torch.cuda.device(device):
            getattr(module, name)(*args, torch.cuda.current_stream(device).cuda_stream, **kwargs)
    else:
        getattr(module, name)(*args, **kwargs)
