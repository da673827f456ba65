"""The one place that decides which backend runs a kdops loss, and the one lazy import of kernels.

Backends (each declared by a :class:`kdops.backends.Backend` in its package):
  ``"triton"``  Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  ``"cuda"``    the CUDA C++ kernels of the native module ``kdops._C_cuda``: CUDA tensors
  ``"cpu"``     the OpenMP C++ kernels of the native module ``kdops._C``: CPU tensors
  ``"torch"``   the plain-PyTorch reference (:mod:`kdops.reference`): any device, any dtype

Choice: the ``backend`` argument, else the environment variable ``KDOPS_BACKEND``, else
automatic: CUDA tensors -> triton, then cuda, then torch; CPU tensors -> cpu, then torch.
A backend asked for by name that cannot run the call is an error, never a silent fallback.
:func:`kernels` then gives the resolved backend's module of a family (its launchers, one
signature per family); a backend without kernels of a family is an error there too, so each
op resolves ``"torch"`` (the reference) explicitly before asking for kernels.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Optional

import torch

from kdops.backends import TORCH, Backend, BackendStatus
from kdops.backends import native as _native
from kdops.backends import triton as _triton

__all__ = ["BACKENDS", "ENV_VAR", "BackendStatus", "available_backends", "kernels", "offers",
           "resolve_backend", "why_not"]

DECLARATIONS: dict[str, Backend] = {b.name: b for b in (_triton.BACKEND, _native.CUDA, _native.CPU, TORCH)}
BACKENDS: tuple[str, ...] = tuple(DECLARATIONS)
ENV_VAR = "KDOPS_BACKEND"
_AUTOMATIC = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def available_backends() -> dict[str, BackendStatus]:
    """Each backend's availability on this machine, with the reason when it is not available."""
    return {name: backend.status() for name, backend in DECLARATIONS.items()}


def why_not(name: str, device: torch.device, dtype: torch.dtype, family: Optional[str] = None,
            n_teachers: int = 1) -> Optional[str]:
    """None if backend ``name`` can run a call on ``device`` / ``dtype`` tensors (of ``family``
    with ``n_teachers`` teachers, if given), else why not."""
    reasons = DECLARATIONS[name].not_supported_reasons(device, dtype, family, n_teachers)
    return "; ".join(reasons) if reasons else None


def offers(family: str, name: str, device: torch.device, dtype: torch.dtype, n_teachers: int = 1) -> bool:
    """Whether backend ``name`` has kernels of ``family`` for this call. Only for a family that is
    an alternative to a generic path on the same backend (the blockwise ``"fused_linear"``
    kernel beside the chunked driver over ``"kd"``), never to choose another backend."""
    return DECLARATIONS[name].package is not None and why_not(name, device, dtype, family, n_teachers) is None


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing: no graph break
def resolve_backend(requested: Optional[str], device: torch.device, dtype: torch.dtype,
                    family: Optional[str] = None, n_teachers: int = 1) -> str:
    """The backend that runs a call on ``device`` / ``dtype`` tensors (of ``family`` with
    ``n_teachers`` teachers: the backend must have kernels of it, or be ``"torch"``);
    ``requested`` is the user's ``backend`` argument (None: the environment variable, then
    automatic)."""
    source = "backend"
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        source = f"environment variable {ENV_VAR}"
    if requested is None or requested == "auto":
        order = _AUTOMATIC["cuda" if device.type == "cuda" else "cpu"]
        return next(name for name in order if why_not(name, device, dtype, family, n_teachers) is None)
    if requested not in BACKENDS:
        raise ValueError(
            f"{source} must be one of {', '.join(map(repr, BACKENDS + ('auto',)))}; got {requested!r}"
        )
    reason = why_not(requested, device, dtype, family, n_teachers)
    if reason is not None:
        raise RuntimeError(f"{source}={requested!r} cannot run this call: {reason}")
    return requested


@functools.lru_cache(maxsize=None)
def kernels(family: str, backend: str) -> ModuleType:
    """The module with ``backend``'s launchers of ``family`` (``kdops.backends.<package>.<family>``):
    the only place kdops imports a kernel module, on first use (Triton's modules read
    ``TRITON_INTERPRET`` when imported). Every backend's module of a family has the same
    launcher signatures (the family's contract, in its ops module)."""
    declared = DECLARATIONS[backend]
    if declared.package is None:
        raise LookupError(f"the {backend!r} backend has no kernels: a call resolved to it runs kdops.reference")
    if family not in declared.families:
        raise LookupError(f"the {backend!r} backend has no kernels of the {family!r} family")
    return importlib.import_module(f"{declared.package}.{family}")
