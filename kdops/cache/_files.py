"""The files of a teacher cache: crash-safe writes, a sealed manifest, ``.npy`` maps that hold no
file descriptor, the directory lock and the removal of what a killed writer left behind.

Crash safety rests on one rule: a file becomes part of the cache only when a manifest naming it
(with its size and SHA-256) has replaced the previous one with ``os.replace``, and every file is
complete and on disk (``fsync``) before any manifest names it. A writer killed at any point leaves
the last committed manifest intact; what it wrote after it (temporary files, shard files no
manifest names) is removed by the next writer's flush, under the directory lock.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

MANIFEST = "manifest.json"
LOCK = ".lock"
# what a flush may create: shard files and the temporary files of _write_file
SHARD_FILE = re.compile(r"shard-\d{5}\.[a-z]+\.npy")
TEMPORARY_FILE = re.compile(r"\..+\.tmp-\d+")

try:
    import fcntl
except ImportError:  # not POSIX (Windows): one writer at a time, as documented
    fcntl = None


class CacheError(ValueError):
    """A cache that cannot be used: missing, corrupt or truncated files, settings that do not
    match the ones asked for, or a write that failed (nothing of it committed)."""


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable against power loss, where the file system allows
    (best effort: the rename is done, so a failure here must not undo a commit)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes ``path`` whole or not at all: ``write(f)`` fills a temporary file beside it, which
    is flushed to disk and then renamed over ``path``. On an error the temporary file is removed
    and the error raised; ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)


def save_npy(path: Path, array: np.ndarray) -> None:
    write_file(path, lambda f: np.save(f, array, allow_pickle=False))


def map_npy(path: Path, shape: tuple[int, ...], stored: np.dtype, view: torch.dtype) -> torch.Tensor:
    """The C-ordered ``.npy`` array at ``path`` as a tensor of dtype ``view`` (the bits of
    ``stored``) on a copy-on-write memory map of the file, which holds no file descriptor
    (``torch.from_file``). :class:`CacheError` unless the header says ``shape`` and ``stored`` and
    the file ends with the data."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            header_shape, fortran, dtype = read_header(f)
            offset = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, SyntaxError) as e:
        raise CacheError(f"cache shard file {path} cannot be read: {e}") from None
    if header_shape != shape or dtype != stored or (fortran and len(shape) > 1):
        raise CacheError(f"cache shard file {path} holds a {dtype} array of shape {header_shape}; "
                         f"the manifest says {np.dtype(stored)} of shape {shape}")
    nbytes = int(np.prod(shape)) * np.dtype(stored).itemsize
    if offset + nbytes != size:
        raise CacheError(f"cache shard file {path} has {size} bytes; its header says {offset + nbytes}")
    if offset % 16:
        raise CacheError(f"cache shard file {path} has its data at an unaligned offset {offset}")
    mapped = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    return mapped[offset:].view(view).view(shape)


def seal(manifest: dict) -> dict:
    """``manifest`` with its ``"sha256"``: the SHA-256 of the rest in canonical JSON."""
    body = {key: value for key, value in manifest.items() if key != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {**body, "sha256": hashlib.sha256(canonical).hexdigest()}


def read_sealed(path: Path) -> dict:
    """The manifest at ``path``; :class:`CacheError` if it cannot be read or parsed or its seal
    does not match its content (any changed byte that changes what it says)."""
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CacheError(f"the cache manifest {path} cannot be read: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        raise CacheError(f"{path} is not a kdops teacher cache manifest (no JSON object with a SHA-256 seal; "
                         "caches of kdops before format version 2 have none: rebuild them)")
    if seal(manifest)["sha256"] != manifest["sha256"]:
        raise CacheError(f"the cache manifest {path} is corrupt (its SHA-256 seal does not match its content)")
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    """Commits ``manifest`` (sealed): the one atomic step of a flush."""
    text = json.dumps(seal(manifest), indent=1).encode()
    write_file(directory / MANIFEST, lambda f: f.write(text))


def remove_uncommitted(directory: Path, committed: set[str]) -> None:
    """Removes the shard and temporary files in ``directory`` that are not in ``committed``:
    left by a writer killed mid-flush (call with the directory lock held)."""
    for entry in os.scandir(directory):
        name = entry.name
        if name not in committed and (SHARD_FILE.fullmatch(name) or TEMPORARY_FILE.fullmatch(name)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


@contextlib.contextmanager
def directory_lock(directory: Path):
    """Holds an exclusive lock on ``directory / LOCK`` (across processes) for the ``with`` block;
    the kernel releases it when its holder dies. :class:`CacheError` if it cannot be created."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK, "a+b")
    except OSError as e:
        raise CacheError(f"cannot create the lock of the cache directory {directory}: {e}") from None
    with handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
