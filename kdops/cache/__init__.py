"""Offline teacher: a sharded disk cache of the teacher's top-k soft targets.

Run the teacher once, keep per token its top-k log-probabilities at temperature ``T``
(``log_softmax(teacher_logits / T)``), their int32 vocabulary indices and the log of the rest mass
``log(1 - sum of the kept probabilities)``; then distill from the cache with
:func:`kdops.sparse_distill_loss`. Layout of a cache directory::

    manifest.json                 format, k, temperature, vocab_size, dtype, teacher, num_tokens,
                                  num_examples, and per shard its counts and its files' sizes
                                  and SHA-256 checksums
    shard-00000.values.npy        [tokens, k] log-probabilities: float32, float16, or bfloat16
                                  stored as its raw 16 bits (numpy has no bfloat16)
    shard-00000.indices.npy       [tokens, k] int32
    shard-00000.rest.npy          [tokens] float32 log rest mass
    shard-00000.examples.npy      [examples, 3] int64: example id, first token, number of tokens

The files are standard ``.npy`` arrays, memory-mapped for reading (``cache[example_id]`` returns
views of the mapped file: no copy). Writes are buffered and flushed as a new shard; the manifest
is replaced atomically after the shard's files are complete, so an interrupted run loses only
its unflushed tokens, and a cache reopened with the same settings is appended to. Truncated
files are detected when the cache is opened (sizes), corrupted ones before a shard's first use
(checksums, ``verify=True``): both raise :class:`CacheError` and return no data. Any number of
readers and writers (threads or processes, e.g. one teacher process per data shard) may use a
cache at once: flushes are serialised by an exclusive lock on ``.lock`` in the directory
(``fcntl.flock``: POSIX file systems; NFS only where it supports flock), and each flush first
adopts the shards other writers have added. A reader sees the shards that existed when it opened.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

FORMAT = "kdops-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 20
# value dtype name -> (torch dtype, numpy storage dtype)
VALUE_DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.int16),  # raw bits, viewed as torch.bfloat16
}
_FILES = ("values", "indices", "rest", "examples")
LOCK = ".lock"

try:
    import fcntl
except ImportError:  # not POSIX (Windows): one writer at a time, as documented
    fcntl = None


class CacheError(ValueError):
    """A cache that cannot be used: missing, corrupt or truncated files, or settings that do not
    match the ones asked for."""


class TeacherTopK(NamedTuple):
    """Top-k soft targets of a run of tokens."""

    logprobs: Tensor  # [tokens, k] log-probabilities at the cache's temperature (cache dtype)
    indices: Tensor  # [tokens, k] int32 vocabulary indices
    rest_logprob: Tensor  # [tokens] float32 log(1 - sum(exp(logprobs)))
    lengths: Tensor  # [examples] int64 tokens per example, in the order asked for


def topk_targets(teacher_logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, indices, rest)`` of ``(..., V)`` logits: the top-k of ``log_softmax(logits / T)``
    (float32), their int32 indices and ``log`` of the probability outside the top-k (float32,
    computed as a log-sum-exp over those entries, so accurate when it is tiny)."""
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, indices, -math.inf).logsumexp(-1)
    return values, indices.to(torch.int32), rest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


@contextlib.contextmanager
def _directory_lock(directory: Path):
    """Holds an exclusive lock on ``directory / LOCK`` (across processes) for the ``with`` block."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class TeacherCache:
    """A cache directory of teacher top-k soft targets (see the module docstring).

    ``TeacherCache(directory)`` opens an existing cache; with ``k``, ``temperature`` and
    ``vocab_size`` it creates one if there is none, and otherwise checks that the existing one
    has these settings (:class:`CacheError` if not) and appends to it. ``dtype`` is the stored
    value type (``"bfloat16"``, ``"float16"`` or ``"float32"``), ``teacher`` a free-form name.
    ``shard_tokens``: tokens per shard (buffered in memory until flushed). ``verify``: check each
    shard's checksums before its first read.

    >>> with TeacherCache("cache/", k=32, temperature=1.0, vocab_size=V, teacher="llama") as cache:
    ...     cache.write([0, 1], teacher_logits)                      # [2, L, V]
    >>> batch = TeacherCache("cache/").read([0, 1])                  # [2 * L, 32] top-k
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        *,
        k: Optional[int] = None,
        temperature: Optional[float] = None,
        vocab_size: Optional[int] = None,
        dtype: Optional[str] = None,
        teacher: Optional[str] = None,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        verify: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.verify = verify
        self.shard_tokens = shard_tokens
        self._lock = threading.Lock()
        self._pending: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_tokens = 0
        self._arrays: dict[int, dict[str, np.ndarray]] = {}  # shard -> mapped files, once verified
        path = self.directory / MANIFEST
        wanted = {"k": k, "temperature": temperature, "vocab_size": vocab_size, "dtype": dtype, "teacher": teacher}
        if path.exists():
            self.manifest = self._load_manifest(path)
            for key, value in wanted.items():
                if value is not None and self.manifest[key] != value:
                    raise CacheError(
                        f"the cache at {self.directory} has {key}={self.manifest[key]!r}; asked for {key}={value!r}"
                    )
        else:
            if k is None or temperature is None or vocab_size is None:
                raise CacheError(
                    f"no cache at {self.directory} ({MANIFEST} not found); to create one give k, temperature and vocab_size"
                )
            dtype = dtype or "bfloat16"
            if dtype not in VALUE_DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(map(repr, VALUE_DTYPES))}; got {dtype!r}")
            if not (isinstance(k, int) and 1 <= k <= vocab_size):
                raise ValueError(f"k must be an integer in [1, vocab_size={vocab_size}]; got {k!r}")
            if not (math.isfinite(temperature) and temperature > 0):
                raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
            self.manifest = {
                "format": FORMAT, "version": VERSION, "k": k, "temperature": float(temperature),
                "vocab_size": vocab_size, "dtype": dtype, "teacher": teacher or "", "num_tokens": 0,
                "num_examples": 0, "shards": [],
            }
        self._index = self._build_index()

    # ---- settings ----
    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def dtype(self) -> torch.dtype:
        return VALUE_DTYPES[self.manifest["dtype"]][0]

    @property
    def num_tokens(self) -> int:
        return self.manifest["num_tokens"] + self._pending_tokens

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, example_id: int) -> bool:
        return int(example_id) in self._index

    def example_ids(self) -> list[int]:
        return list(self._index)

    # ---- opening ----
    def _load_manifest(self, path: Path) -> dict:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"the cache manifest {path} cannot be read: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CacheError(f"{path} is not a kdops teacher cache manifest")
        if manifest.get("version") != VERSION:
            raise CacheError(f"{path} has format version {manifest.get('version')}; this kdops reads {VERSION}")
        for shard in manifest["shards"]:
            for kind in _FILES:
                f = self.directory / shard["files"][kind]["name"]
                size = f.stat().st_size if f.exists() else None
                if size != shard["files"][kind]["size"]:
                    state = "is missing" if size is None else f"has {size} bytes"
                    raise CacheError(
                        f"cache shard file {f} {state}; the manifest says {shard['files'][kind]['size']} "
                        "(truncated or replaced)"
                    )
        return manifest

    def _build_index(self, index: Optional[dict] = None, first_shard: int = 0) -> dict[int, tuple[int, int, int]]:
        """example id -> (shard, first token, tokens), from the small example tables of the shards
        from ``first_shard`` on, added to ``index`` (checksummed now when ``verify``; the other
        files before their first read)."""
        index = {} if index is None else index
        for n in range(first_shard, len(self.manifest["shards"])):
            if self.verify:
                self._check_sum(n, "examples")
            for eid, start, length in self._map(n, "examples").tolist():
                index[eid] = (n, start, length)
        return index

    def _adopt_new_shards(self) -> None:
        """Takes in the shards other writers have added since this object read the manifest
        (called under the directory lock)."""
        path = self.directory / MANIFEST
        if not path.exists():
            return
        known = len(self.manifest["shards"])
        on_disk = self._load_manifest(path)
        for key in ("k", "temperature", "vocab_size", "dtype"):
            if on_disk[key] != self.manifest[key]:
                raise CacheError(f"the cache at {self.directory} now has {key}={on_disk[key]!r}; this writer was "
                                 f"opened with {key}={self.manifest[key]!r}")
        if len(on_disk["shards"]) > known:
            self.manifest = on_disk
            self._build_index(self._index, first_shard=known)

    def _check_sum(self, n: int, kind: str) -> None:
        entry = self.manifest["shards"][n]["files"][kind]
        path = self.directory / entry["name"]
        if _sha256(path) != entry["sha256"]:
            raise CacheError(f"cache shard file {path} is corrupt (its SHA-256 does not match the manifest)")

    def _map(self, n: int, kind: str) -> np.ndarray:
        shard = self.manifest["shards"][n]
        path = self.directory / shard["files"][kind]["name"]
        try:
            array = np.load(path, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheError(f"cache shard file {path} cannot be read: {e}") from None
        rows = shard["num_examples"] if kind == "examples" else shard["num_tokens"]
        shape = {"values": (rows, self.k), "indices": (rows, self.k), "rest": (rows,), "examples": (rows, 3)}[kind]
        if array.shape != shape:
            raise CacheError(f"cache shard file {path} has shape {array.shape}; the manifest says {shape}")
        return array

    def _shard(self, n: int) -> dict[str, np.ndarray]:
        """The mapped files of shard n, their checksums verified on first use (if ``verify``)."""
        arrays = self._arrays.get(n)
        if arrays is not None:
            return arrays
        with self._lock:
            if n not in self._arrays:
                if self.verify:
                    for kind in _FILES[:3]:
                        self._check_sum(n, kind)
                self._arrays[n] = {kind: self._map(n, kind) for kind in _FILES}
            return self._arrays[n]

    # ---- reading ----
    def _views(self, example_id: int) -> tuple[Tensor, Tensor, Tensor]:
        try:
            n, start, length = self._index[int(example_id)]
        except KeyError:
            raise KeyError(f"example id {example_id} is not in the cache at {self.directory}") from None
        arrays = self._shard(n)
        values = torch.from_numpy(arrays["values"][start:start + length])
        if self.manifest["dtype"] == "bfloat16":
            values = values.view(torch.bfloat16)
        return (values, torch.from_numpy(arrays["indices"][start:start + length]),
                torch.from_numpy(arrays["rest"][start:start + length]))

    def __getitem__(self, example_id: int) -> TeacherTopK:
        """One example's soft targets, as views of the memory-mapped shard (no copy)."""
        values, indices, rest = self._views(example_id)
        return TeacherTopK(values, indices, rest, torch.tensor([values.shape[0]]))

    def read(self, example_ids: Sequence[int]) -> TeacherTopK:
        """The examples' soft targets concatenated along tokens (in the order of ``example_ids``;
        ``lengths`` gives each one's tokens): O(tokens read), wherever they are."""
        parts = [self._views(e) for e in example_ids]
        if not parts:
            empty = torch.empty(0, self.k)
            return TeacherTopK(empty.to(self.dtype), empty.int(), torch.empty(0), torch.empty(0, dtype=torch.long))
        values, indices, rest = (torch.cat(x) for x in zip(*parts))
        return TeacherTopK(values, indices, rest, torch.tensor([p[0].shape[0] for p in parts]))

    def verify_all(self) -> None:
        """Checks every shard's checksums now (:class:`CacheError` on the first bad one)."""
        for n in range(len(self.manifest["shards"])):
            self._shard(n)

    def stats(self) -> dict:
        """Tokens, examples, shards, disk bytes (per token) and coverage: the mean, minimum and
        5th percentile over tokens of the kept probability mass ``1 - exp(rest_logprob)``."""
        sizes = sum(f["size"] for s in self.manifest["shards"] for f in s["files"].values())
        coverage = [1.0 - np.exp(self._shard(n)["rest"].astype(np.float64)) for n in range(len(self.manifest["shards"]))]
        cov = np.concatenate(coverage) if coverage else np.zeros(0)
        tokens = self.manifest["num_tokens"]
        return {
            "tokens": tokens, "examples": self.manifest["num_examples"], "shards": len(self.manifest["shards"]),
            "k": self.k, "disk_bytes": sizes, "bytes_per_token": sizes / tokens if tokens else 0.0,
            "coverage_mean": float(cov.mean()) if cov.size else 0.0,
            "coverage_min": float(cov.min()) if cov.size else 0.0,
            "coverage_p5": float(np.percentile(cov, 5)) if cov.size else 0.0,
        }

    # ---- writing ----
    def write(self, example_ids: Union[int, Sequence[int]], teacher_logits: Tensor,
              lengths: Optional[Sequence[int]] = None) -> None:
        """Adds the soft targets of teacher logits: one example ``[L, V]`` (``example_ids`` an
        int), or a batch ``[B, L, V]`` with ``B`` ids; ``lengths`` keeps only each example's
        first tokens (padding dropped). The top-k is taken at the cache's temperature."""
        if teacher_logits.shape[-1] != self.vocab_size:
            raise CacheError(f"teacher_logits have vocabulary size {teacher_logits.shape[-1]}; the cache has "
                             f"vocab_size={self.vocab_size}")
        if isinstance(example_ids, int):
            example_ids, teacher_logits = [example_ids], teacher_logits.unsqueeze(0)
        if teacher_logits.dim() != 3 or teacher_logits.shape[0] != len(example_ids):
            raise ValueError(f"teacher_logits must be [B, L, V] with B = {len(example_ids)} example ids; "
                             f"got {tuple(teacher_logits.shape)}")
        values, indices, rest = topk_targets(teacher_logits.detach(), self.k, self.temperature)
        for b, eid in enumerate(example_ids):
            n = teacher_logits.shape[1] if lengths is None else int(lengths[b])
            self.write_topk(eid, values[b, :n], indices[b, :n], rest[b, :n])

    def write_topk(self, example_id: int, logprobs: Tensor, indices: Tensor, rest_logprob: Tensor) -> None:
        """Adds one example's precomputed top-k: ``[L, k]`` log-probabilities and indices and the
        ``[L]`` log rest mass."""
        eid = int(example_id)
        if eid in self._index or any(p[0] == eid for p in self._pending):
            raise ValueError(f"example id {eid} is already in the cache at {self.directory}")
        if logprobs.dim() != 2 or logprobs.shape[1] != self.k or indices.shape != logprobs.shape:
            raise CacheError(f"logprobs and indices must be [L, k={self.k}]; got {tuple(logprobs.shape)} and "
                             f"{tuple(indices.shape)}")
        if rest_logprob.shape != logprobs.shape[:1]:
            raise ValueError(f"rest_logprob must be [L={logprobs.shape[0]}]; got {tuple(rest_logprob.shape)}")
        values = logprobs.detach().to("cpu", self.dtype)
        stored = values.view(torch.int16) if self.dtype == torch.bfloat16 else values
        self._pending.append((eid, stored.numpy(), indices.detach().to("cpu", torch.int32).numpy(),
                              rest_logprob.detach().to("cpu", torch.float32).numpy()))
        self._pending_tokens += logprobs.shape[0]
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered examples as a new shard and updates the manifest (atomically),
        holding the directory's lock; :class:`CacheError` (nothing written, the examples stay
        buffered) if another writer has meanwhile added one of their example ids."""
        if not self._pending:
            return
        with self._lock, _directory_lock(self.directory):
            self._adopt_new_shards()
            taken = [p[0] for p in self._pending if p[0] in self._index]
            if taken:
                raise CacheError(f"example ids {taken[:8]} were added to the cache at {self.directory} by another "
                                 "writer; nothing was written")
            self._write_shard()

    def _write_shard(self) -> None:
        n = len(self.manifest["shards"])
        lengths = np.array([p[1].shape[0] for p in self._pending], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ids = np.array([p[0] for p in self._pending], dtype=np.int64)
        arrays = {
            "values": np.concatenate([p[1] for p in self._pending]),
            "indices": np.concatenate([p[2] for p in self._pending]),
            "rest": np.concatenate([p[3] for p in self._pending]),
            "examples": np.stack([ids, starts, lengths], axis=1),
        }
        files = {}
        for kind, array in arrays.items():
            path = self.directory / f"shard-{n:05d}.{kind}.npy"
            _write_atomic(path, lambda tmp, a=array: _save_npy(tmp, a))
            files[kind] = {"name": path.name, "size": path.stat().st_size, "sha256": _sha256(path)}
        tokens = int(lengths.sum())
        self.manifest["shards"].append({"num_tokens": tokens, "num_examples": len(ids), "files": files})
        self.manifest["num_tokens"] += tokens
        self.manifest["num_examples"] += len(ids)
        _write_atomic(self.directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=1)))
        for eid, start, length in zip(ids.tolist(), starts.tolist(), lengths.tolist()):
            self._index[eid] = (n, start, length)
        self._pending, self._pending_tokens = [], 0

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TeacherCache({str(self.directory)!r}, k={m['k']}, temperature={m['temperature']}, "
                f"vocab_size={m['vocab_size']}, dtype={m['dtype']!r}, teacher={m['teacher']!r}, "
                f"examples={len(self)}, tokens={self.num_tokens})")


class ProgressBar:
    """A one-line progress bar on stderr: ``[#####-----] 12/40 batches  3.1k tok/s``."""

    def __init__(self, total: Optional[int], what: str = "batches", stream=None, width: int = 30) -> None:
        self.total, self.what, self.width = total, what, width
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.tokens, self.start = 0, 0, time.perf_counter()

    def update(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        if self.total:
            filled = int(self.width * min(self.done / self.total, 1.0))
            bar = f"[{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done}"
        self.stream.write(f"\r{bar} {self.what}  {self.tokens} tokens  {rate:,.0f} tok/s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def build_cache(
    teacher_fn: Callable[[object], Tensor],
    batches: Iterable[tuple[Sequence[int], object]],
    directory: Union[str, os.PathLike],
    *,
    k: int,
    temperature: float = 1.0,
    dtype: str = "bfloat16",
    teacher: str = "",
    total: Optional[int] = None,
    progress: bool = True,
    **cache_options,
) -> TeacherCache:
    """Runs ``teacher_fn(inputs) -> logits [B, L, V]`` over ``batches`` of ``(example_ids,
    inputs)`` under ``torch.no_grad()`` and writes the top-k to the cache at ``directory``
    (created, or appended to), with a progress bar on stderr (``total``: the number of batches,
    if known). Returns the cache, flushed."""
    bar = ProgressBar(total) if progress else None
    cache = None
    with torch.no_grad():
        for ids, inputs in batches:
            logits = teacher_fn(inputs)
            if cache is None:
                cache = TeacherCache(directory, k=k, temperature=temperature, vocab_size=logits.shape[-1],
                                     dtype=dtype, teacher=teacher, **cache_options)
            cache.write(list(ids), logits)
            if bar is not None:
                bar.update(logits.shape[0] * logits.shape[1])
    if bar is not None:
        bar.close()
    if cache is None:
        raise ValueError("build_cache: batches was empty")
    cache.flush()
    return cache

