"""Measurements of kdops.bench: median timings, peak memory, and a description of the machine.

Timing: ``warmup`` calls, then the median of ``repeats`` calls, each timed alone: on CUDA with
CUDA events around the call (or ``triton.testing.do_bench``'s median, ``timer="do_bench"``), on
CPU with ``time.perf_counter``.

Peak memory above what is held before the call (the inputs are held before):
  * CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``), exact.
  * CPU, resident set: the process's peak resident set (``VmHWM``, reset to the current resident
    set through ``/proc/self/clear_refs``) minus the resident set before. It sees every byte the
    call touches, torch's tensors and native scratch alike, plus some noise (a few MiB: code paged
    in, Python objects). glibc keeps small freed blocks resident and reuses them, so a peak made
    of reused memory reads low; :func:`return_freed_memory` makes every allocation of 64 KiB or
    more its own mapping, returned on free, and each measurement first returns the free pages
    inside the heap (``malloc_trim``), which leaves that noise to blocks below 64 KiB.
  * CPU, torch allocator: the peak of the running sum of torch's CPU allocations and frees during
    the call, from the profiler's memory events. Exact for tensors, blind to memory that does not
    come from torch's allocator (native kernels' own scratch).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from typing import Callable, Iterator, Optional, TextIO

import torch

import kdops

MiB = 2**20
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIMERS: tuple[str, ...] = ("events", "do_bench")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
                   timer: str = "events") -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    if device.type == "cuda" and timer == "do_bench":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median") / 1e3  # its own time-based warm-up and repeats
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def resident_set_supported() -> bool:
    """Whether this process can reset and read its peak resident set (Linux)."""
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


def _release_free_heap_pages() -> None:
    """glibc's ``malloc_trim(0)``: returns the free pages inside the heap to the system. Without
    it, a call can be served from freed chunks that an earlier allocation left resident (below the
    mmap threshold, or before :func:`return_freed_memory` fixed it), and its peak reads low."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory of ``fn()`` above what is held before it: the CUDA allocator's peak on CUDA,
    the process's peak resident set on CPU (see the module's docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _release_free_heap_pages()
    before = _status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    fn()
    return _status_bytes("VmHWM:") - before


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences file descriptor 2 (the profiler's C++ start/stop lines); Python errors still raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def torch_cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of torch's CPU allocations of ``fn()`` above the start: the maximum of the running sum
    of the profiler's memory events (allocations positive, frees negative)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            held += event.nbytes()
            peak = max(peak, held)
    return peak


def return_freed_memory() -> bool:
    """Makes glibc serve every allocation of 64 KiB or more by its own mapping, unmapped on free
    (no dynamic threshold), so that freed buffers leave the resident set and a later call's peak
    is not hidden in pages an earlier one left resident. Applies to every method alike; False
    where this is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Measured device copy bandwidth (bytes read + written per second)."""
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    seconds = median_seconds(lambda: y.copy_(x), device, repeats=10, warmup=3)
    return 2 * nbytes / seconds


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    """Date, versions, CPU / GPU names and kdops's available backends."""
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kdops": kdops.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    for package in ("triton", "numpy", "liger-kernel", "torchtune"):
        version = _version(package)
        if version is not None:
            info[package.replace("-", "_")] = version
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or platform.machine()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    info["backends"] = {k: v.reason for k, v in kdops.available_backends().items() if v.available}
    return info


def describe_machine(info: dict) -> str:
    """One line: the device that ran the benchmark and the CPU."""
    cpu = f"{info.get('cpu', '?')} ({info.get('cpu_count', '?')} cores)"
    return f"{info['gpu']}, {cpu}" if "gpu" in info else f"{cpu}, no GPU used"


class Progress:
    """A progress bar on ``stream`` (stderr): redrawn in place on a terminal, one line per step
    otherwise (logs)."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 24) -> None:
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._last = ""

    def step(self, label: str) -> None:
        """Shows that the next step, ``label``, starts."""
        filled = self.width * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done + 1}/{self.total} "
                f"{elapsed:6.1f}s {label}")
        self._draw(line)
        self.done += 1

    def write(self, text: str) -> None:
        """Prints ``text`` to stdout without breaking the bar."""
        if self.tty and self._last:
            self.stream.write("\r" + " " * len(self._last) + "\r")
        print(text, flush=True)
        if self.tty and self._last:
            self.stream.write(self._last)
            self.stream.flush()

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        self._draw(f"[{'#' * self.width}] {self.done}/{self.total} {elapsed:6.1f}s done")
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, line: str) -> None:
        if self.tty:
            pad = " " * max(len(self._last) - len(line), 0)
            self.stream.write("\r" + line + pad)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line
