"""Triton kernels of kdops (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``): the
``"triton"`` backend's declaration. One module per family (``kd``, ``sparse_kd``, ``fused_linear``,
``affinity``), each its ``@triton.jit`` kernels and their launcher; ``_common`` the shared helpers.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os

import torch

from kdops.backends import FLOAT_DTYPES, Backend, BackendStatus, Family


def _version_at_least(major: int, minor: int) -> bool:
    """Whether the installed Triton is at least ``major.minor`` (read without importing it)."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in version.split(".")[:2]) >= (major, minor)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _status(interpreting: bool) -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed (pip install triton)")
    import triton

    if interpreting:
        return BackendStatus(True, f"triton {triton.__version__}, interpreter (TRITON_INTERPRET=1)")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)")
    return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")


# The most teachers one kd call mixes: the kernel's [BLOCK_K, BLOCK_V] teacher tile holds 4096
# elements (kd.py's GPU vocabulary block) down to rows of 16 lanes, at 256 teachers; past that the
# tile would grow with K. Compiled for sm_80/90/100 at 32, 128 and 256 teachers (bf16, float32,
# float64, JSD and skew reverse KL, gradients): no spill (float64 at 256: 166 registers).
KD_MAX_TEACHERS = 256

BACKEND = Backend(
    name="triton",
    package=__name__,
    device_types=lambda: ("cuda", "cpu") if _interpreting() else ("cuda",),
    dtypes=FLOAT_DTYPES,
    status=lambda: _status(_interpreting()),
    families={
        "kd": Family(max_teachers=KD_MAX_TEACHERS),
        "sparse_kd": Family(),
        # the blockwise kernel: one teacher, 16/32-bit inputs (others take the chunked path over "kd")
        "fused_linear": Family(dtypes=(torch.float32, torch.float16, torch.bfloat16), max_teachers=1),
        # float64 relation kernels: Triton's tl.dot takes float64 from 3.9 on (3.6 fails to compile them)
        "affinity": Family(dtypes=FLOAT_DTYPES if _version_at_least(3, 9) else FLOAT_DTYPES[:3]),
        # float64 likewise from Triton 3.9 on (under 3.6 its float64 tiles spill 0.3-0.5 KB per thread)
        "attention_relation": Family(dtypes=FLOAT_DTYPES if _version_at_least(3, 9) else FLOAT_DTYPES[:3]),
    },
)
