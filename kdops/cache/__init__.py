"""Offline teacher: a sharded disk cache of the teacher's soft targets, crash-safe.

Run the teacher once and keep per token either (``mode="topk"``, the default) its top-k
log-probabilities at temperature ``T`` (``log_softmax(teacher_logits / T)``), their int32
vocabulary indices and the log of the rest mass ``log(1 - sum of the kept probabilities)``, or
(``mode="sample"``) ``k`` draws from ``softmax(teacher_logits / T)`` as distinct int32 token ids
and their counts; then distill from the cache with :func:`kdops.sparse_distill_loss`. Reading a
sampled cache gives ``log(count / k)`` (``-inf`` for the count-0 padding ids) and a rest of
``-inf``: with ``rest_mass="ignore"`` the forward-KL gradient is then an unbiased estimate of the
dense one. Layout of a cache directory::

    manifest.json                 format, version, mode, k, temperature, vocab_size, dtype,
                                  teacher, num_tokens, num_examples, per shard its counts and its
                                  files' sizes and SHA-256, and a SHA-256 seal of all that
    shard-00000.values.npy        topk: [tokens, k] log-probabilities: float32, float16, or
                                  bfloat16 stored as its raw 16 bits (numpy has no bfloat16)
    shard-00000.rest.npy          topk: [tokens] float32 log rest mass
    shard-00000.counts.npy        sample: [tokens, k] counts (uint8, uint16 or int32 by k)
    shard-00000.indices.npy       [tokens, k] int32
    shard-00000.examples.npy      [examples, 3] int64: example id, first token, number of tokens

The files are standard ``.npy`` arrays, memory-mapped for reading without holding a file
descriptor (``cache[example_id]`` of a top-k cache returns views of the mapped file: no copy).
Writes are buffered and flushed as a new shard. A flush is crash-safe: each file is written to
a temporary name, synced and renamed, and the shard becomes part of the cache only when the
sealed manifest naming it replaces the previous one (atomically); a writer killed at any point
leaves the last committed cache, and the next flush removes the files it left. A failed write
(e.g. a full disk) is a :class:`CacheError` with nothing of it visible, its examples still
buffered. A cache reopened with the same settings is appended to. Truncated files and a
manifest whose seal does not match are detected when the cache is opened, corrupted shards
before a shard's first use (checksums, ``verify=True``): both raise :class:`CacheError` and
return no data. Any number of readers and writers (threads or processes, e.g. one teacher
process per data shard) may use a cache at once: flushes are serialised by an exclusive lock
on ``.lock`` in the directory (``fcntl.flock``: POSIX file systems; NFS only where it supports
flock), and each flush first adopts the shards other writers have added. A reader sees the
shards that existed when it opened.
"""
from __future__ import annotations

import contextlib
import hashlib
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

from kdops.cache._files import (
    LOCK,
    MANIFEST,
    SHARD_FILE,
    CacheError,
    directory_lock,
    map_npy,
    read_sealed,
    remove_uncommitted,
    save_npy,
    sha256_of_file,
    write_manifest,
)
from kdops.cache.targets import sample_logprobs, sample_targets, topk_targets

__all__ = ["CacheError", "TeacherCache", "TeacherTopK", "build_cache", "example_seed", "sample_targets", "topk_targets"]

FORMAT = "kdops-teacher-cache"
VERSION = 2
MODES = ("topk", "sample")
DEFAULT_SHARD_TOKENS = 1 << 20
TARGET_CHUNK_ELEMENTS = 1 << 26  # teacher logits per chunk of rows in write: 256 MiB float32 temporaries
# top-k value dtype name -> (torch dtype read, numpy dtype stored)
VALUE_DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.int16),  # raw bits, viewed as torch.bfloat16
}
# sampled count dtype name -> (torch dtype, numpy dtype), the smallest that holds k
COUNT_DTYPES = {
    "uint8": (torch.uint8, np.uint8),
    "uint16": (torch.uint16, np.uint16),
    "int32": (torch.int32, np.int32),
}
# the files of a shard, per mode
SHARD_FILES = {"topk": ("values", "indices", "rest", "examples"), "sample": ("counts", "indices", "examples")}
SETTINGS = ("mode", "k", "temperature", "vocab_size", "dtype")


def example_seed(seed: int, example_id: int) -> int:
    """The seed of example ``example_id``'s draws in a cache seeded with ``seed``: 63 bits of
    ``SHA-256(f"{seed}:{example_id}")``. Each example has its own stream, so a sampled cache is
    the same whatever the batching, the order, the resumptions or the number of writers."""
    digest = hashlib.sha256(f"{seed}:{int(example_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def count_dtype(k: int) -> str:
    """The name of the smallest count dtype that holds ``k``."""
    return "uint8" if k <= 255 else "uint16" if k <= 65535 else "int32"


def _check_settings(mode: Optional[str], k: Optional[int], temperature: Optional[float],
                    dtype: Optional[str]) -> None:
    """ValueError naming the first bad one of the settings given (None: not given)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not (math.isfinite(temperature) and temperature > 0)):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if dtype is not None:
        if mode == "sample":
            raise ValueError(f"dtype applies to mode='topk' (a sampled cache stores integer counts); "
                             f"got dtype={dtype!r}")
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, VALUE_DTYPES))}; got {dtype!r}")


class TeacherTopK(NamedTuple):
    """Sparse soft targets of a run of tokens, as :func:`kdops.sparse_distill_loss` takes them."""

    logprobs: Tensor  # [tokens, k] log-probabilities at the cache's temperature (topk: cache dtype;
    #                   sample: float32 log(count / k), -inf for count 0)
    indices: Tensor  # [tokens, k] int32 distinct vocabulary indices
    rest_logprob: Tensor  # [tokens] float32 log(1 - sum(exp(logprobs))) (sample: -inf)
    lengths: Tensor  # [examples] int64 tokens per example, in the order asked for


class TeacherCache:
    """A cache directory of teacher soft targets (see the module docstring).

    ``TeacherCache(directory)`` opens an existing cache; with ``k``, ``temperature`` and
    ``vocab_size`` it creates one if there is none, and otherwise checks that the existing one
    has the settings given (``mode``, ``k``, ``temperature``, ``vocab_size``, ``dtype``,
    ``teacher``: :class:`CacheError` if not) and appends to it. ``mode``: ``"topk"`` (default)
    or ``"sample"`` (``k`` draws per token, each example's from a generator seeded with
    :func:`example_seed` of ``seed`` and its id; None: torch's global generator). ``dtype``: the
    stored top-k value type (``"bfloat16"``, ``"float16"`` or ``"float32"``; a sampled cache
    stores counts). ``teacher``: a free-form name.
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
        mode: Optional[str] = None,
        k: Optional[int] = None,
        temperature: Optional[float] = None,
        vocab_size: Optional[int] = None,
        dtype: Optional[str] = None,
        teacher: Optional[str] = None,
        seed: Optional[int] = None,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        verify: bool = True,
    ) -> None:
        _check_settings(mode, k, temperature, dtype)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None; got {seed!r}")
        self.directory = Path(directory)
        self.verify = verify
        self.shard_tokens = shard_tokens
        self.seed = seed
        self._lock = threading.Lock()
        self._pending: list[tuple[int, dict[str, np.ndarray]]] = []
        self._pending_tokens = 0
        self._arrays: dict[int, dict[str, Tensor]] = {}  # shard -> mapped files, once verified
        path = self.directory / MANIFEST
        wanted = {"mode": mode, "k": k, "temperature": temperature, "vocab_size": vocab_size, "dtype": dtype,
                  "teacher": teacher}
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
                    f"no cache at {self.directory} ({MANIFEST} not found); to create one give k, temperature and "
                    "vocab_size"
                )
            mode = mode or "topk"
            if not (isinstance(vocab_size, int) and k <= vocab_size):
                raise ValueError(f"k must be an integer in [1, vocab_size={vocab_size}]; got {k!r}")
            self.manifest = {
                "format": FORMAT, "version": VERSION, "mode": mode, "k": k, "temperature": float(temperature),
                "vocab_size": vocab_size, "dtype": count_dtype(k) if mode == "sample" else dtype or "bfloat16",
                "teacher": teacher or "", "num_tokens": 0, "num_examples": 0, "shards": [],
            }
        self._index = self._build_index()

    # ---- settings ----
    @property
    def mode(self) -> str:
        return self.manifest["mode"]

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
        """The dtype of the log-probabilities read (float32 for a sampled cache)."""
        return torch.float32 if self.mode == "sample" else VALUE_DTYPES[self.manifest["dtype"]][0]

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
        """The sealed manifest at ``path``, its settings and every shard file's size checked."""
        manifest = read_sealed(path)
        if manifest.get("format") != FORMAT:
            raise CacheError(f"{path} is not a kdops teacher cache manifest")
        if manifest.get("version") != VERSION:
            raise CacheError(f"{path} has format version {manifest.get('version')}; this kdops reads {VERSION} "
                             "(rebuild the cache)")
        try:
            mode, k, dtypes = manifest["mode"], manifest["k"], {**VALUE_DTYPES, **COUNT_DTYPES}
            if mode not in MODES or not isinstance(k, int) or k < 1 or manifest["dtype"] not in dtypes:
                raise ValueError(f"mode={mode!r}, k={k!r}, dtype={manifest['dtype']!r}")
            for shard in manifest["shards"]:
                for kind in SHARD_FILES[mode]:
                    entry = shard["files"][kind]
                    if not SHARD_FILE.fullmatch(entry["name"]):
                        raise ValueError(f"shard file name {entry['name']!r}")
                    f = self.directory / entry["name"]
                    size = f.stat().st_size if f.exists() else None
                    if size != entry["size"]:
                        state = "is missing" if size is None else f"has {size} bytes"
                        raise CacheError(f"cache shard file {f} {state}; the manifest says {entry['size']} "
                                         "(truncated or replaced)")
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CacheError):
                raise
            raise CacheError(f"the cache manifest {path} is malformed ({type(e).__name__}: {e})") from None
        return manifest

    def _build_index(self, index: Optional[dict] = None, first_shard: int = 0) -> dict[int, tuple[int, int, int]]:
        """example id -> (shard, first token, tokens), from the small example tables of the shards
        from ``first_shard`` on, added to ``index`` (checksummed now when ``verify``; the other
        files before their first read)."""
        index = {} if index is None else index
        for n in range(first_shard, len(self.manifest["shards"])):
            if self.verify:
                self._check_sum(n, "examples")
            table = self._map(n, "examples").tolist()
            tokens = self.manifest["shards"][n]["num_tokens"]
            if any(start < 0 or length < 0 or start + length > tokens for _, start, length in table):
                raise CacheError(f"cache shard {n} of {self.directory} has an example table that points outside "
                                 f"its {tokens} tokens")
            for eid, start, length in table:
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
        for key in SETTINGS:
            if on_disk[key] != self.manifest[key]:
                raise CacheError(f"the cache at {self.directory} now has {key}={on_disk[key]!r}; this writer was "
                                 f"opened with {key}={self.manifest[key]!r}")
        if len(on_disk["shards"]) > known:
            self.manifest = on_disk
            self._build_index(self._index, first_shard=known)

    def _check_sum(self, n: int, kind: str) -> None:
        entry = self.manifest["shards"][n]["files"][kind]
        path = self.directory / entry["name"]
        try:
            digest = sha256_of_file(path)
        except OSError as e:
            raise CacheError(f"cache shard file {path} cannot be read: {e}") from None
        if digest != entry["sha256"]:
            raise CacheError(f"cache shard file {path} is corrupt (its SHA-256 does not match the manifest)")

    def _file_spec(self, kind: str, rows: int) -> tuple[tuple[int, ...], type, torch.dtype]:
        """(shape, numpy dtype stored, torch dtype read) of a shard file of ``rows`` rows."""
        if kind == "values":
            view, stored = VALUE_DTYPES[self.manifest["dtype"]]
        elif kind == "counts":
            view, stored = COUNT_DTYPES[self.manifest["dtype"]]
        else:
            view, stored = {"indices": (torch.int32, np.int32), "rest": (torch.float32, np.float32),
                            "examples": (torch.int64, np.int64)}[kind]
        shape = {"rest": (rows,), "examples": (rows, 3)}.get(kind, (rows, self.k))
        return shape, stored, view

    def _map(self, n: int, kind: str) -> Tensor:
        shard = self.manifest["shards"][n]
        rows = shard["num_examples"] if kind == "examples" else shard["num_tokens"]
        shape, stored, view = self._file_spec(kind, rows)
        return map_npy(self.directory / shard["files"][kind]["name"], shape, np.dtype(stored), view)

    def _shard(self, n: int) -> dict[str, Tensor]:
        """The mapped files of shard n, their checksums verified on first use (if ``verify``)."""
        arrays = self._arrays.get(n)
        if arrays is not None:
            return arrays
        with self._lock:
            if n not in self._arrays:
                kinds = SHARD_FILES[self.mode]
                if self.verify:
                    for kind in kinds[:-1]:  # the example table was checked when opened
                        self._check_sum(n, kind)
                self._arrays[n] = {kind: self._map(n, kind) for kind in kinds}
            return self._arrays[n]

    # ---- reading ----
    def _views(self, example_id: int) -> dict[str, Tensor]:
        """One example's rows of each shard file but the example table (views of the maps)."""
        try:
            n, start, length = self._index[int(example_id)]
        except KeyError:
            raise KeyError(f"example id {example_id} is not in the cache at {self.directory}") from None
        return {kind: array[start:start + length] for kind, array in self._shard(n).items() if kind != "examples"}

    def _targets(self, parts: dict[str, Tensor], lengths: Tensor) -> TeacherTopK:
        if self.mode == "sample":
            rest = torch.full(parts["indices"].shape[:1], -math.inf)
            return TeacherTopK(sample_logprobs(parts["counts"], self.k), parts["indices"], rest, lengths)
        return TeacherTopK(parts["values"], parts["indices"], parts["rest"], lengths)

    def __getitem__(self, example_id: int) -> TeacherTopK:
        """One example's soft targets (top-k: views of the memory-mapped shard, no copy)."""
        parts = self._views(example_id)
        return self._targets(parts, torch.tensor([parts["indices"].shape[0]]))

    def read(self, example_ids: Sequence[int]) -> TeacherTopK:
        """The examples' soft targets concatenated along tokens (in the order of ``example_ids``;
        ``lengths`` gives each one's tokens): O(tokens read), wherever they are."""
        parts = [self._views(e) for e in example_ids]
        if not parts:
            empty = torch.empty(0, self.k)
            return TeacherTopK(empty.to(self.dtype), empty.int(), torch.empty(0), torch.empty(0, dtype=torch.long))
        joined = {kind: torch.cat([p[kind] for p in parts]) for kind in parts[0]}
        return self._targets(joined, torch.tensor([p["indices"].shape[0] for p in parts]))

    def verify_all(self) -> None:
        """Checks every shard's checksums now (:class:`CacheError` on the first bad one)."""
        for n in range(len(self.manifest["shards"])):
            self._shard(n)

    def stats(self) -> dict:
        """Tokens, examples, shards, disk bytes (per token) and, for a top-k cache, its coverage:
        the mean, minimum and 5th percentile over tokens of the kept probability mass
        ``1 - exp(rest_logprob)``; for a sampled cache the mean number of distinct ids drawn."""
        shards = range(len(self.manifest["shards"]))
        sizes = sum(f["size"] for s in self.manifest["shards"] for f in s["files"].values())
        tokens = self.manifest["num_tokens"]
        stats = {
            "mode": self.mode, "tokens": tokens, "examples": self.manifest["num_examples"],
            "shards": len(shards), "k": self.k, "disk_bytes": sizes,
            "bytes_per_token": sizes / tokens if tokens else 0.0,
        }
        if self.mode == "sample":
            distinct = sum(int((self._shard(n)["counts"] > 0).sum()) for n in shards)
            return {**stats, "distinct_mean": distinct / tokens if tokens else 0.0}
        coverage = [1.0 - np.exp(self._shard(n)["rest"].double().numpy()) for n in shards]
        cov = np.concatenate(coverage) if coverage else np.zeros(0)
        return {
            **stats,
            "coverage_mean": float(cov.mean()) if cov.size else 0.0,
            "coverage_min": float(cov.min()) if cov.size else 0.0,
            "coverage_p5": float(np.percentile(cov, 5)) if cov.size else 0.0,
        }

    # ---- writing ----
    def _generator(self, device: torch.device, example_id: int) -> Optional[torch.Generator]:
        """The generator of one example's draws: seeded with :func:`example_seed` (None: torch's
        global generator when the cache has no ``seed``)."""
        if self.seed is None:
            return None
        return torch.Generator(device).manual_seed(example_seed(self.seed, example_id))

    def _by_rows(self, targets: Callable[[Tensor], tuple[Tensor, ...]], rows: Tensor) -> tuple[Tensor, ...]:
        """``targets`` of ``[N, V]`` rows, a chunk of rows at a time (bounded float32 temporaries)."""
        step = max(1, TARGET_CHUNK_ELEMENTS // self.vocab_size)
        parts = [targets(rows[i:i + step]) for i in range(0, max(rows.shape[0], 1), step)]
        return tuple(torch.cat(x) for x in zip(*parts))

    def write(self, example_ids: Union[int, Sequence[int]], teacher_logits: Tensor,
              lengths: Optional[Sequence[int]] = None) -> None:
        """Adds the soft targets of teacher logits: one example ``[L, V]`` (``example_ids`` an
        int), or a batch ``[B, L, V]`` with ``B`` ids; ``lengths`` keeps only each example's
        first tokens (padding dropped). The top-k is taken, or the k draws made (for each example
        from its own generator, see :func:`example_seed`), at the cache's temperature."""
        if teacher_logits.shape[-1] != self.vocab_size:
            raise CacheError(f"teacher_logits have vocabulary size {teacher_logits.shape[-1]}; the cache has "
                             f"vocab_size={self.vocab_size}")
        if isinstance(example_ids, int):
            example_ids, teacher_logits = [example_ids], teacher_logits.unsqueeze(0)
        if teacher_logits.dim() != 3 or teacher_logits.shape[0] != len(example_ids):
            raise ValueError(f"teacher_logits must be [B, L, V] with B = {len(example_ids)} example ids; "
                             f"got {tuple(teacher_logits.shape)}")
        if lengths is not None and len(lengths) != len(example_ids):
            raise ValueError(f"lengths must have one entry per example id ({len(example_ids)}); got {len(lengths)}")
        logits = teacher_logits.detach()
        if self.mode == "topk":
            batch, length = logits.shape[:2]
            values, indices, rest = self._by_rows(lambda rows: topk_targets(rows, self.k, self.temperature),
                                                  logits.reshape(-1, self.vocab_size))
            values, indices = (x.reshape(batch, length, self.k) for x in (values, indices))
            rest = rest.reshape(batch, length)
        for b, eid in enumerate(example_ids):
            n = logits.shape[1] if lengths is None else int(lengths[b])
            if self.mode == "topk":
                self.write_topk(eid, values[b, :n], indices[b, :n], rest[b, :n])
                continue
            generator = self._generator(logits.device, eid)
            self.write_samples(eid, *self._by_rows(
                lambda rows: sample_targets(rows, self.k, self.temperature, generator), logits[b, :n]))

    def _check_rows(self, what: str, values: Tensor, indices: Tensor) -> None:
        if values.dim() != 2 or values.shape[1] != self.k or indices.shape != values.shape:
            raise CacheError(f"{what} and indices must be [L, k={self.k}]; got {tuple(values.shape)} and "
                             f"{tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.vocab_size):
            raise ValueError(f"indices must lie in [0, vocab_size={self.vocab_size})")

    def write_topk(self, example_id: int, logprobs: Tensor, indices: Tensor, rest_logprob: Tensor) -> None:
        """Adds one example's precomputed top-k (a ``mode="topk"`` cache): ``[L, k]``
        log-probabilities and indices and the ``[L]`` log rest mass."""
        if self.mode != "topk":
            raise CacheError(f"write_topk adds to a mode='topk' cache; the cache at {self.directory} has "
                             f"mode={self.mode!r}")
        self._check_rows("logprobs", logprobs, indices)
        if rest_logprob.shape != logprobs.shape[:1]:
            raise ValueError(f"rest_logprob must be [L={logprobs.shape[0]}]; got {tuple(rest_logprob.shape)}")
        values = logprobs.detach().to("cpu", self.dtype)
        stored = values.view(torch.int16) if self.dtype == torch.bfloat16 else values
        self._add(example_id, {"values": stored.numpy(), "indices": indices.detach().to("cpu", torch.int32).numpy(),
                               "rest": rest_logprob.detach().to("cpu", torch.float32).numpy()})

    def write_samples(self, example_id: int, counts: Tensor, indices: Tensor) -> None:
        """Adds one example's precomputed draws (a ``mode="sample"`` cache): ``[L, k]`` counts
        (each row summing to k) at ``[L, k]`` distinct indices (as :func:`sample_targets`)."""
        if self.mode != "sample":
            raise CacheError(f"write_samples adds to a mode='sample' cache; the cache at {self.directory} has "
                             f"mode={self.mode!r}")
        self._check_rows("counts", counts, indices)
        counts = counts.detach().to("cpu", torch.int64)
        if counts.numel() and (int(counts.min()) < 0 or not bool((counts.sum(1) == self.k).all())):
            raise ValueError(f"counts must be non-negative with each row summing to k={self.k}")
        stored = COUNT_DTYPES[self.manifest["dtype"]][1]
        self._add(example_id, {"counts": counts.numpy().astype(stored),
                               "indices": indices.detach().to("cpu", torch.int32).numpy()})

    def _add(self, example_id: int, arrays: dict[str, np.ndarray]) -> None:
        eid = int(example_id)
        if eid in self._index or any(p[0] == eid for p in self._pending):
            raise ValueError(f"example id {eid} is already in the cache at {self.directory}")
        self._pending.append((eid, arrays))
        self._pending_tokens += arrays["indices"].shape[0]
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered examples as a new shard and commits it (the manifest replaced
        atomically), holding the directory's lock, after removing what a killed writer left.
        :class:`CacheError` (nothing written, the examples stay buffered) if another writer has
        meanwhile added one of their example ids, or if a write fails (e.g. the disk is full)."""
        if not self._pending:
            return
        with self._lock, directory_lock(self.directory):
            self._adopt_new_shards()
            taken = [p[0] for p in self._pending if p[0] in self._index]
            if taken:
                raise CacheError(f"example ids {taken[:8]} were added to the cache at {self.directory} by another "
                                 "writer; nothing was written")
            committed = {MANIFEST, LOCK} | {f["name"] for s in self.manifest["shards"] for f in s["files"].values()}
            try:
                remove_uncommitted(self.directory, committed)
            except OSError as e:
                raise CacheError(f"cannot remove the files a killed writer left in {self.directory}: {e}") from None
            self._write_shard()

    def _write_shard(self) -> None:
        n = len(self.manifest["shards"])
        lengths = np.array([p[1]["indices"].shape[0] for p in self._pending], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ids = np.array([p[0] for p in self._pending], dtype=np.int64)
        arrays = {kind: np.ascontiguousarray(np.concatenate([p[1][kind] for p in self._pending]))  # C order
                  for kind in SHARD_FILES[self.mode][:-1]}
        arrays["examples"] = np.stack([ids, starts, lengths], axis=1)
        files, written = {}, []
        try:
            for kind, array in arrays.items():
                path = self.directory / f"shard-{n:05d}.{kind}.npy"
                written.append(path)
                save_npy(path, array)
                files[kind] = {"name": path.name, "size": path.stat().st_size, "sha256": sha256_of_file(path)}
            tokens = int(lengths.sum())
            manifest = {**self.manifest,
                        "shards": [*self.manifest["shards"], {"num_tokens": tokens, "num_examples": len(ids),
                                                             "files": files}],
                        "num_tokens": self.manifest["num_tokens"] + tokens,
                        "num_examples": self.manifest["num_examples"] + len(ids)}
            write_manifest(self.directory, manifest)
        except BaseException as e:  # nothing committed: remove this flush's files, keep the examples buffered
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if isinstance(e, OSError):
                raise CacheError(f"writing shard {n} of the cache at {self.directory} failed ({e}); nothing was "
                                 f"committed and its {len(ids)} examples stay buffered (flush again)") from e
            raise
        self.manifest = manifest
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
        return (f"TeacherCache({str(self.directory)!r}, mode={m['mode']!r}, k={m['k']}, "
                f"temperature={m['temperature']}, vocab_size={m['vocab_size']}, dtype={m['dtype']!r}, "
                f"teacher={m['teacher']!r}, examples={len(self)}, tokens={self.num_tokens})")


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
    mode: str = "topk",
    seed: Optional[int] = None,
    dtype: Optional[str] = None,
    teacher: str = "",
    total: Optional[int] = None,
    progress: bool = True,
    **cache_options,
) -> TeacherCache:
    """Runs ``teacher_fn(inputs) -> logits [B, L, V]`` over ``batches`` of ``(example_ids,
    inputs)`` (or ``(example_ids, inputs, lengths)``: each example's first tokens kept) under
    ``torch.no_grad()`` and writes the soft targets to the cache at ``directory`` (created, or
    appended to): ``mode="topk"`` the top-k (values stored in ``dtype``, default bfloat16),
    ``mode="sample"`` k draws per token (reproducible with ``seed``: :func:`example_seed`). A
    progress bar goes to stderr (``total``: the number of batches, if known). Returns the cache, flushed."""
    _check_settings(mode, k, temperature, dtype)
    if mode == "topk" and dtype is None:
        dtype = "bfloat16"
    bar = ProgressBar(total) if progress else None
    cache = None
    with torch.no_grad():
        for ids, inputs, *lengths in batches:
            logits = teacher_fn(inputs)
            if cache is None:
                cache = TeacherCache(directory, mode=mode, k=k, temperature=temperature, vocab_size=logits.shape[-1],
                                     dtype=dtype, teacher=teacher, seed=seed, **cache_options)
            cache.write(list(ids), logits, *lengths)
            if bar is not None:
                bar.update(int(sum(lengths[0])) if lengths else logits.shape[0] * logits.shape[1])
    if bar is not None:
        bar.close()
    if cache is None:
        raise ValueError("build_cache: batches was empty")
    cache.flush()
    return cache
