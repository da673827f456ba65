"""The kernels of kdops, one folder per backend, and the record each backend declares itself with.

``triton/`` (Triton kernels) and ``native/`` (launchers of the C++ / CUDA modules ``kdops._C`` and
``kdops._C_cuda``) each declare their backends in their ``__init__.py`` with a :class:`Backend`:
the device types and dtypes its kernels take, its families (a family ``f`` of a backend whose
package is ``p`` is the module ``p.f``: its launchers, imported only by
:func:`kdops._dispatch.kernels`), what each family supports beyond that, and a ``status()`` that
says whether it can run here (without importing any kernel module). The ``"torch"`` backend,
declared here, has no kernels: a call resolved to it runs :mod:`kdops.reference`, the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Optional

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class BackendStatus(NamedTuple):
    available: bool
    reason: str


@dataclass(frozen=True)
class Family:
    """What a backend's kernels of one family take beyond the backend's own declaration."""

    dtypes: Optional[tuple[torch.dtype, ...]] = None  # None: every dtype of the backend
    max_teachers: Optional[int] = None  # the most teachers one call mixes (None: no limit)


@dataclass(frozen=True)
class Backend:
    """A backend's declaration: the dispatch asks it, never a kernel module, whether it can run a call."""

    name: str
    package: Optional[str]  # the package holding the family modules (None: no kernels, the reference)
    device_types: Callable[[], tuple[str, ...]]  # device types of the tensors it runs on ("any": every device)
    dtypes: tuple[torch.dtype, ...]
    status: Callable[[], BackendStatus]
    families: Mapping[str, Family] = field(default_factory=dict)

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, family: Optional[str] = None,
                              n_teachers: int = 1) -> list[str]:
        """Why this backend cannot run a call on ``device`` / ``dtype`` tensors (of ``family``
        with ``n_teachers`` teachers, if given); empty if it can."""
        status = self.status()
        if not status.available:
            return [status.reason]
        reasons = []
        devices = self.device_types()
        if "any" not in devices and device.type not in devices:
            reasons.append(f"it runs on {' or '.join(d.upper() for d in devices)} tensors, these are on {device}")
        if dtype not in self.dtypes:
            reasons.append(f"it does not take {dtype} tensors")
        if family is not None and self.package is not None:
            if family not in self.families:
                reasons.append(f"it has no kernels of the {family!r} family")
            else:
                declared = self.families[family]
                if declared.dtypes is not None and dtype not in declared.dtypes:
                    reasons.append(f"its {family!r} kernels do not take {dtype} tensors")
                if declared.max_teachers is not None and n_teachers > declared.max_teachers:
                    reasons.append(f"its {family!r} kernels mix at most {declared.max_teachers} teachers, "
                                   f"this call has {n_teachers}")
        return reasons


def _torch_status() -> BackendStatus:
    return BackendStatus(True, f"torch {torch.__version__}: the reference (kdops.reference)")


TORCH = Backend(name="torch", package=None, device_types=lambda: ("any",), dtypes=FLOAT_DTYPES,
                status=_torch_status)
