"""Launchers of the native kernels (``csrc/``): one module per family, all through ``_module``;
the declarations of the ``"cpu"`` (``kdops._C``, OpenMP) and ``"cuda"`` (``kdops._C_cuda``)
backends, which share these launchers (the tensors' device picks the module)."""
from __future__ import annotations

import functools

import torch

from kdops.backends import FLOAT_DTYPES, Backend, BackendStatus, Family

# csrc/cuda/kd.cu: kMaxTeachers (their row statistics fill 32 KiB of shared memory).
CUDA_MAX_TEACHERS = 4096


@functools.lru_cache(maxsize=None)
def _status(which: str) -> BackendStatus:
    from kdops.backends.native import _module  # loads the native module, no kernel launcher

    ok, reason = _module.cpu_status() if which == "cpu" else _module.cuda_status()
    return BackendStatus(ok, reason)


CPU = Backend(
    name="cpu",
    package=__name__,
    device_types=lambda: ("cpu",),
    dtypes=FLOAT_DTYPES,
    status=lambda: _status("cpu"),
    families={"kd": Family(), "sparse_kd": Family(), "affinity": Family(), "attention_relation": Family()},
)

CUDA = Backend(
    name="cuda",
    package=__name__,
    device_types=lambda: ("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    status=lambda: _status("cuda"),
    families={"kd": Family(max_teachers=CUDA_MAX_TEACHERS), "sparse_kd": Family(), "affinity": Family(),
              "attention_relation": Family()},
)
