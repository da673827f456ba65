"""The one place that decides which backend runs a kdops loss.

Backends:
  ``"triton"``  Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  ``"cuda"``    the CUDA C++ kernels of the native module ``kdops._C_cuda``: CUDA tensors
  ``"cpu"``     the OpenMP C++ kernels of the native module ``kdops._C``: CPU tensors
  ``"torch"``   the plain-PyTorch reference (:mod:`kdops.reference`): any device, any dtype

Choice: the ``backend`` argument, else the environment variable ``KDOPS_BACKEND``, else
automatic: CUDA tensors -> triton, then cuda, then torch; CPU tensors -> cpu, then torch.
A backend asked for by name that cannot run the call is an error, never a silent fallback.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple, Optional

import torch

BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "KDOPS_BACKEND"

# dtypes each backend's kernels take (the torch reference takes every floating dtype).
_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_status(interpreting: bool) -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed (pip install triton)")
    import triton

    if interpreting:
        return BackendStatus(True, f"triton {triton.__version__}, interpreter (TRITON_INTERPRET=1)")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)")
    return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")


@functools.lru_cache(maxsize=None)
def _native_status(which: str) -> BackendStatus:
    from kdops.backends.native import _module

    ok, reason = _module.cpu_status() if which == "cpu" else _module.cuda_status()
    return BackendStatus(ok, reason)


def available_backends() -> dict[str, BackendStatus]:
    """Each backend's availability on this machine, with the reason when it is not available."""
    return {
        "triton": _triton_status(_interpreting()),
        "cuda": _native_status("cuda"),
        "cpu": _native_status("cpu"),
        "torch": BackendStatus(True, f"torch {torch.__version__}"),
    }


def _status(name: str) -> BackendStatus:
    if name == "triton":
        return _triton_status(_interpreting())
    if name == "torch":
        return BackendStatus(True, "")
    return _native_status(name)


def _runs_on(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if backend ``name`` can run on this device and dtype, else why not."""
    status = _status(name)
    if not status.available:
        return status.reason
    if name != "torch" and dtype not in _DTYPES[name]:
        return f"it does not take {dtype} tensors"
    if name == "cpu" and device.type != "cpu":
        return f"it runs on CPU tensors, these are on {device}"
    if name == "cuda" and device.type != "cuda":
        return f"it runs on CUDA tensors, these are on {device}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"it runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), these are on {device}"
    return None


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing: no graph break
def resolve_backend(requested: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a call on ``device`` / ``dtype`` tensors; ``requested`` is the
    user's ``backend`` argument (None: the environment variable, then automatic)."""
    source = "backend"
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        source = f"environment variable {ENV_VAR}"
    if requested is None or requested == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(name for name in order if _runs_on(name, device, dtype) is None)
    if requested not in BACKENDS:
        raise ValueError(
            f"{source} must be one of {', '.join(map(repr, BACKENDS + ('auto',)))}; got {requested!r}"
        )
    why_not = _runs_on(requested, device, dtype)
    if why_not is not None:
        raise RuntimeError(f"{source}={requested!r} cannot run this call: {why_not}")
    return requested
