"""kdops.cache.TeacherCache: bit-exact round trips, appending, corruption and mismatch errors,
concurrent readers and writers, the CLI, and distillation from a cache."""
import errno
import gc
import importlib.metadata
import io
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

import kdops
from kdops.cache import CacheError, TeacherCache, build_cache, example_seed, sample_targets, topk_targets
from kdops.cache.__main__ import main as cache_cli

V, K, T = 50, 8, 2.0


def logits_batch(b, length, seed):
    return torch.randn(b, length, V, generator=torch.Generator().manual_seed(seed)) * 3


def write_cache(path, dtype="bfloat16", shard_tokens=10, n_batches=3, first_id=0, **options):
    with TeacherCache(path, k=K, temperature=T, vocab_size=V, dtype=dtype, teacher="toy",
                      shard_tokens=shard_tokens, **options) as cache:
        for n in range(n_batches):
            cache.write([first_id + 2 * n, first_id + 2 * n + 1], logits_batch(2, 5, first_id + n))
    return cache


def expected(example_id, first_id=0):
    """The top-k of example ``example_id`` as written by write_cache."""
    n, b = divmod(example_id - first_id, 2)
    return topk_targets(logits_batch(2, 5, first_id + n)[b], K, T)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_bit_exact(tmp_path, dtype):
    write_cache(tmp_path, dtype=dtype)
    cache = TeacherCache(tmp_path)
    assert cache.k == K and cache.vocab_size == V and cache.temperature == T and len(cache) == 6
    assert cache.manifest["num_tokens"] == 30 and len(cache.manifest["shards"]) == 3
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    for eid in (4, 0, 5):
        values, indices, rest = expected(eid)
        got = cache[eid]
        assert got.logprobs.dtype == torch_dtype and got.indices.dtype == torch.int32
        assert torch.equal(got.logprobs.view(torch.int16 if dtype != "float32" else torch.int32),
                           values.to(torch_dtype).view(torch.int16 if dtype != "float32" else torch.int32))
        assert torch.equal(got.indices, indices) and torch.equal(got.rest_logprob, rest)
    batch = cache.read([5, 1, 2])
    assert batch.lengths.tolist() == [5, 5, 5]
    assert torch.equal(batch.indices, torch.cat([expected(e)[1] for e in (5, 1, 2)]))


def test_reads_are_zero_copy_views(tmp_path):
    write_cache(tmp_path)
    cache = TeacherCache(tmp_path)
    a, b = cache[3], cache[3]
    assert a.logprobs.data_ptr() == b.logprobs.data_ptr()  # the same mapped pages, no copy
    n, start, _ = cache._index[3]
    path = tmp_path / f"shard-{n:05d}.values.npy"
    storage = a.logprobs.untyped_storage()  # the whole file, mapped
    assert storage.nbytes() == path.stat().st_size
    offset = a.logprobs.data_ptr() - storage.data_ptr()
    assert storage.nbytes() - offset == (10 - start) * K * 2  # the example's rows onward, bf16


def test_appending_across_runs(tmp_path):
    write_cache(tmp_path, n_batches=2)
    write_cache(tmp_path, n_batches=2, first_id=100)  # a second run, same settings
    cache = TeacherCache(tmp_path)
    assert len(cache) == 8 and cache.num_tokens == 40
    assert torch.equal(cache[101].indices, expected(101, first_id=100)[1])
    assert torch.equal(cache[2].indices, expected(2)[1])
    with pytest.raises(ValueError, match="already in the cache"):
        TeacherCache(tmp_path).write(0, logits_batch(1, 2, 0)[0])


@pytest.mark.parametrize("key,value", [("k", 16), ("vocab_size", 51), ("temperature", 1.0), ("dtype", "float32")])
def test_manifest_mismatch(tmp_path, key, value):
    write_cache(tmp_path, n_batches=1)
    options = dict(k=K, temperature=T, vocab_size=V, dtype="bfloat16")
    options[key] = value
    with pytest.raises(CacheError, match=f"{key}="):
        TeacherCache(tmp_path, **options)


def test_wrong_vocabulary_on_write(tmp_path):
    cache = TeacherCache(tmp_path, k=K, temperature=T, vocab_size=V)
    with pytest.raises(CacheError, match="vocab_size=50"):
        cache.write(0, torch.randn(3, V + 1))


def test_truncated_shard(tmp_path):
    write_cache(tmp_path)
    path = tmp_path / "shard-00001.values.npy"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CacheError, match="shard-00001.values.npy has .* bytes; the manifest says"):
        TeacherCache(tmp_path)


def test_corrupt_shard_returns_no_data(tmp_path):
    write_cache(tmp_path)
    path = tmp_path / "shard-00002.indices.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    cache = TeacherCache(tmp_path)
    assert torch.equal(cache[0].indices, expected(0)[1])  # other shards still read
    with pytest.raises(CacheError, match="corrupt"):
        cache[4]
    with pytest.raises(CacheError, match="corrupt"):
        cache.read([0, 5])
    with pytest.raises(CacheError, match="corrupt"):
        cache.verify_all()


def test_missing_or_bad_manifest(tmp_path):
    with pytest.raises(CacheError, match="no cache"):
        TeacherCache(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="cannot be read"):
        TeacherCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CacheError, match="not a kdops teacher cache"):
        TeacherCache(tmp_path)
    old = {"format": "kdops-teacher-cache", "version": 1, "k": K, "temperature": T, "vocab_size": V, "shards": []}
    (tmp_path / "manifest.json").write_text(json.dumps(old))  # format version 1 had no seal
    with pytest.raises(CacheError, match="before format version 2 have none: rebuild"):
        TeacherCache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(kdops.cache._files.seal(old)))
    with pytest.raises(CacheError, match="format version 1; this kdops reads 2"):
        TeacherCache(tmp_path)
    sealed = kdops.cache._files.seal({**old, "version": 2, "mode": "topk", "dtype": "float32",
                                      "shards": [{"files": {"values": {"name": "../../etc/passwd"}}}]})
    (tmp_path / "manifest.json").write_text(json.dumps(sealed))  # sealed, but not by kdops
    with pytest.raises(CacheError, match="malformed"):
        TeacherCache(tmp_path)


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        TeacherCache(tmp_path, k=K, temperature=T, vocab_size=V, dtype="int8")
    with pytest.raises(ValueError, match="k must be"):
        TeacherCache(tmp_path, k=V + 1, temperature=T, vocab_size=V)
    with pytest.raises(KeyError, match="not in the cache"):
        write_cache(tmp_path)[999]


def _read_all(path):
    cache = TeacherCache(path)
    return [int(cache[e].indices.sum()) for e in sorted(cache.example_ids())]


def test_concurrent_readers(tmp_path):
    write_cache(tmp_path, n_batches=4)
    want = [int(expected(e)[1].sum()) for e in range(8)]
    cache = TeacherCache(tmp_path)  # one cache shared by threads (lazy verification under a lock)
    results, errors = [], []

    def reader():
        try:
            results.append([int(cache.read([e]).indices.sum()) for e in range(8)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [want] * 8
    with ProcessPoolExecutor(2) as pool:  # and separate processes
        assert list(pool.map(_read_all, [str(tmp_path)] * 2)) == [want] * 2


def _write_ids(path, first_id, n_batches):
    """A writer process: its own example ids, flushed every 10 tokens (a shard per batch)."""
    write_cache(path, n_batches=n_batches, first_id=first_id, shard_tokens=10)
    return first_id


def test_concurrent_writers(tmp_path):
    """Writers in separate processes and in threads, flushing into one cache at once: every
    example of every writer is there, bit-exact, and no shard was overwritten."""
    n_batches, firsts = 6, [0, 100, 200, 300]
    # spawned, not forked: a child forked from a process whose OpenMP pool is running can hang in torch
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_write_ids, str(tmp_path), first, n_batches) for first in firsts[:2]]
        threads = [threading.Thread(target=_write_ids, args=(str(tmp_path), first, n_batches)) for first in firsts[2:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(f.result() for f in futures) == firsts[:2]
    cache = TeacherCache(tmp_path, verify=True)
    cache.verify_all()
    assert len(cache) == 2 * n_batches * len(firsts) and cache.num_tokens == 10 * n_batches * len(firsts)
    assert len(cache.manifest["shards"]) == n_batches * len(firsts)
    for first in firsts:
        for e in range(first, first + 2 * n_batches):
            values, indices, rest = expected(e, first_id=first)
            got = cache[e]
            assert torch.equal(got.indices, indices) and torch.equal(got.rest_logprob, rest)
            assert torch.equal(got.logprobs, values.to(torch.bfloat16))


def test_writer_sees_other_writers_ids(tmp_path):
    """Two writers opened on the same cache; the second one's buffered id was meanwhile written by
    the first: its flush refuses (nothing written) instead of storing the id twice."""
    first = TeacherCache(tmp_path, k=K, temperature=T, vocab_size=V, shard_tokens=1000)
    second = TeacherCache(tmp_path, k=K, temperature=T, vocab_size=V, shard_tokens=1000)
    first.write([0, 1], logits_batch(2, 5, 0))
    second.write([1, 2], logits_batch(2, 5, 1))
    first.flush()
    with pytest.raises(CacheError, match=r"example ids \[1\] were added .* by another writer"):
        second.flush()
    assert sorted(TeacherCache(tmp_path).example_ids()) == [0, 1]
    mismatched = TeacherCache(tmp_path / "other", k=K, temperature=T, vocab_size=V)
    mismatched.write(5, logits_batch(1, 5, 2)[0])
    with TeacherCache(tmp_path / "other", k=K, temperature=T, vocab_size=V, dtype="float32") as other:
        other.write(6, logits_batch(1, 5, 3)[0])  # the cache is created on this flush, in float32
    with pytest.raises(CacheError, match="now has dtype='float32'; this writer was opened with dtype='bfloat16'"):
        mismatched.flush()


def test_console_script(tmp_path):
    """``kdops-cache`` (installed by pip) is the same CLI as ``python -m kdops.cache``."""
    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
               if ep.value.startswith("kdops.")}
    if not scripts:
        pytest.skip("kdops is not pip-installed here (no console scripts)")
    assert scripts["kdops-cache"].load() is cache_cli
    executable = shutil.which("kdops-cache")
    if executable is None:
        pytest.skip("kdops-cache is not on PATH")
    write_cache(tmp_path)
    done = subprocess.run([executable, str(tmp_path), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"] == 30


def test_build_cache_progress_and_cli(tmp_path, capfd):
    batches = [([2 * n, 2 * n + 1], logits_batch(2, 5, n)) for n in range(3)]
    cache = build_cache(lambda x: x, batches, tmp_path, k=K, temperature=T, teacher="toy", total=3)
    err = capfd.readouterr().err
    assert "3/3 batches" in err and "30 tokens" in err
    assert torch.equal(cache[3].indices, expected(3)[1])
    assert cache_cli([str(tmp_path), "--verify", "--json"]) == 0
    stats = json.loads(capfd.readouterr().out)
    assert stats["tokens"] == 30 and stats["k"] == K and stats["teacher"] == "toy"
    coverage = np.mean([1 - math.exp(float(r)) for e in range(6) for r in expected(e)[2]])
    assert abs(stats["coverage_mean"] - coverage) < 1e-6
    assert cache_cli([str(tmp_path / "nowhere")]) == 1
    assert "no cache" in capfd.readouterr().err
    text = subprocess.run([sys.executable, "-m", "kdops.cache", str(tmp_path)], capture_output=True, text=True,
                          check=True).stdout
    assert "coverage" in text and "tokens           30" in text


def test_distill_from_cache_matches_dense_at_full_k(tmp_path):
    """k = V, float32: the cached teacher is the full distribution; the loss is distill_loss's."""
    teacher = logits_batch(2, 4, 7)
    with TeacherCache(tmp_path, k=V, temperature=T, vocab_size=V, dtype="float32") as cache:
        cache.write([0, 1], teacher)
    batch = TeacherCache(tmp_path).read([0, 1])
    student = torch.randn(8, V)
    got = kdops.sparse_distill_loss(student, batch.logprobs, batch.indices, temperature=T, rest_mass="bucket")
    want = kdops.distill_loss(student, teacher.reshape(8, V), temperature=T)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


# ---- crash safety: SIGKILL at every step of a flush, full disks, corrupted bytes, file handles ----

# Writes examples 0, 1 (flushed: committed), then 2, 3, and flushes again with np.save / os.fsync /
# os.replace wrapped: at the n-th call of one of them (before it, after it, or for np.save in the
# middle of the file) the writer SIGKILLs itself. One interpreter imports kdops and forks a child
# per kill point and mode, after a first child that records the calls the second flush makes.
CRASH_WRITER = r"""
import io, json, os, signal, sys
import numpy as np
import torch
torch.set_num_threads(1)
from kdops.cache import TeacherCache

root = sys.argv[1]
V, K, T = 50, 8, 2.0

def logits(seed):
    return torch.randn(2, 5, V, generator=torch.Generator().manual_seed(seed)) * 3

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(point, events):
    originals = {"save": np.save, "fsync": os.fsync, "replace": os.replace}
    calls = dict.fromkeys(originals, 0)

    def wrap(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            events.append(name)
            hit = point is not None and point[0] == name and point[1] == calls[name]
            if hit and point[2] == "before":
                kill()
            if hit and point[2] == "mid":
                buffer = io.BytesIO()
                originals["save"](buffer, *args[1:], **kwargs)
                args[0].write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                args[0].flush()
                kill()
            result = originals[name](*args, **kwargs)
            if hit and point[2] == "after":
                kill()
            return result
        return wrapper

    np.save, os.fsync, os.replace = wrap("save"), wrap("fsync"), wrap("replace")

def in_child(work):
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

def run(directory, mode, point, events_file=None):
    cache = TeacherCache(directory, mode=mode.split("-")[0], k=K, temperature=T, vocab_size=V, seed=1,
                         shard_tokens=1000)
    events = []
    cache.write([0, 1], logits(0))
    if mode == "topk-first":  # the crash in the flush that creates the cache
        arm(point, events)
    cache.flush()
    if mode != "topk-first":
        cache.write([2, 3], logits(1))
        arm(point, events)
        cache.flush()
    if events_file:
        with open(events_file, "w") as f:
            json.dump(events, f)

report = {}
for mode in ("topk", "sample", "topk-first"):
    events_file = os.path.join(root, mode + "-events.json")
    in_child(lambda: run(os.path.join(root, mode + "-count"), mode, None, events_file))
    with open(events_file) as f:
        events = json.load(f)
    points, seen = [], {}
    for name in events:
        seen[name] = seen.get(name, 0) + 1
        points += [[name, seen[name], when] for when in ("before", "after") + (("mid",) if name == "save" else ())]
    killed = [in_child(lambda: run(os.path.join(root, f"{mode}-{i}"), mode, point)) for i, point in enumerate(points)]
    report[mode] = {"events": events, "points": points, "killed": killed}
print(json.dumps(report))
"""


def crash_logits(seed):
    return torch.randn(2, 5, V, generator=torch.Generator().manual_seed(seed)) * 3


def reference_cache(path, mode, ids=(0, 1, 2, 3, 4, 5)):
    """The cache CRASH_WRITER writes, written without a crash (same seed: the same draws)."""
    with TeacherCache(path, mode=mode, k=K, temperature=T, vocab_size=V, seed=1, shard_tokens=1000) as cache:
        for first in range(0, len(ids), 2):
            cache.write(list(ids[first:first + 2]), crash_logits(first // 2))
            cache.flush()
    return TeacherCache(path)


def committed_files(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return {"manifest.json", ".lock"} | {f["name"] for s in manifest["shards"] for f in s["files"].values()}


def assert_same_targets(cache, reference, ids):
    for e in ids:
        got, want = cache[e], reference[e]
        for a, b in zip(got, want):
            assert torch.equal(a, b), e


def test_writer_killed_at_every_step_of_a_flush(tmp_path):
    """SIGKILL before / after every np.save, fsync and rename of a flush (and in the middle of
    each file), in both modes and in the flush that creates a cache: the cache opens with
    exactly the committed shards (the second one only once its manifest was renamed in),
    verifies, and the next writer resumes, removing the dead one's files."""
    done = subprocess.run([sys.executable, "-c", CRASH_WRITER, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    first = report.pop("topk-first")
    assert first["killed"] == [True] * len(first["points"])
    for i, (name, n, when) in enumerate(first["points"]):  # killed in the flush that creates the cache
        path = tmp_path / f"topk-first-{i}"
        position = [p for p, e in enumerate(first["events"]) if e == name][n - 1]
        if position > len(first["events"]) - 2 or (position == len(first["events"]) - 2 and when == "after"):
            assert sorted(TeacherCache(path).example_ids()) == [0, 1]
            continue
        with pytest.raises(CacheError, match="no cache"):
            TeacherCache(path)
        with TeacherCache(path, k=K, temperature=T, vocab_size=V) as cache:
            cache.write([0, 1], crash_logits(0))
        assert set(os.listdir(path)) == committed_files(path)
        assert sorted(TeacherCache(path).example_ids()) == [0, 1]
    for mode, runs in report.items():
        events = runs["events"]
        assert events.count("save") == len(kdops.cache.SHARD_FILES[mode]) and events[-2] == "replace"
        assert runs["killed"] == [True] * len(runs["points"])  # every child died by SIGKILL
        reference = reference_cache(tmp_path / f"{mode}-reference", mode)
        left = []
        for i, point in enumerate(runs["points"]):
            name, n, when = point
            position = [p for p, e in enumerate(events) if e == name][n - 1]
            commit = len(events) - 2  # the manifest's rename: the last one
            committed = position > commit or (position == commit and when == "after")
            left.append(check_after_crash(tmp_path / f"{mode}-{i}", mode, point, committed, reference))
        assert 0 < sum(left) < len(left)  # some kills left partial files (removed by the next writer)


def check_after_crash(path, mode, point, committed, reference):
    """The state a killed writer left at ``path``: the committed examples, bit-exact; then a new
    writer's flush completes the cache and leaves only committed files. Returns whether the
    killed writer had left files the manifest does not name."""
    leftovers = set(os.listdir(path)) != committed_files(path)
    cache = TeacherCache(path)
    want = [0, 1, 2, 3] if committed else [0, 1]
    assert sorted(cache.example_ids()) == want, point
    cache.verify_all()
    assert_same_targets(cache, reference, want)
    with TeacherCache(path, mode=mode, k=K, temperature=T, vocab_size=V, seed=1) as resumed:  # the next writer
        if not committed:
            resumed.write([2, 3], crash_logits(1))
        resumed.write([4, 5], crash_logits(2))
    assert set(os.listdir(path)) == committed_files(path), point  # the dead writer's files are gone
    cache = TeacherCache(path)
    cache.verify_all()
    assert sorted(cache.example_ids()) == [0, 1, 2, 3, 4, 5]
    assert_same_targets(cache, reference, range(6) if mode == "topk" else want)  # new draws: new targets
    return leftovers


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _half_then_no_space(f, array, **kwargs):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _no_space()


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_disk_full_during_a_flush(tmp_path, monkeypatch, mode):
    """ENOSPC in the middle of each file a flush writes, or when it is synced: CacheError, the
    directory holds exactly the committed files (nothing partial), the examples stay buffered and
    the next flush, with space again, commits them."""
    reference = reference_cache(tmp_path / "reference", mode, ids=(0, 1, 2, 3))
    kinds = len(kdops.cache.SHARD_FILES[mode])
    faults = [("save", n) for n in range(1, kinds + 1)] + [("fsync", n) for n in range(1, 2 * kinds + 3)]
    for i, (name, n) in enumerate(faults):
        path = tmp_path / str(i)
        cache = TeacherCache(path, mode=mode, k=K, temperature=T, vocab_size=V, seed=1, shard_tokens=1000)
        cache.write([0, 1], crash_logits(0))
        cache.flush()
        cache.write([2, 3], crash_logits(1))
        before = set(os.listdir(path))
        calls, original = [0], {"save": np.save, "fsync": os.fsync}[name]

        def fault(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                return (_half_then_no_space if name == "save" else _no_space)(*args, **kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(np if name == "save" else os, name, fault)
        if name == "save" or n % 2:  # a file's write or sync (a directory's sync after a rename is best effort)
            with pytest.raises(CacheError, match="No space left on device.*nothing was committed"):
                cache.flush()
            assert set(os.listdir(path)) == before == committed_files(path), (name, n)
            assert sorted(TeacherCache(path).example_ids()) == [0, 1] and cache.num_tokens == 20
        else:
            cache.flush()
        monkeypatch.undo()
        cache.flush()
        assert sorted(TeacherCache(path).example_ids()) == [0, 1, 2, 3]
        assert set(os.listdir(path)) == committed_files(path)
        assert_same_targets(TeacherCache(path), reference, range(4))


def test_strided_and_transposed_inputs(tmp_path):
    """Precomputed targets given as expanded or transposed (Fortran-ordered) tensors are stored
    in C order and read back equal."""
    values, indices, rest = topk_targets(logits_batch(1, 6, 0)[0], K, T)
    with TeacherCache(tmp_path / "topk", k=K, temperature=T, vocab_size=V, dtype="float32") as cache:
        cache.write_topk(0, values.t().contiguous().t(), indices.t().contiguous().t(), rest)  # Fortran order
        cache.write_topk(1, values[:1].expand(6, K), indices[:1].expand(6, K), rest[:1].expand(6))  # stride 0
    got = TeacherCache(tmp_path / "topk")
    assert torch.equal(got[0].logprobs, values) and torch.equal(got[0].indices, indices)
    assert torch.equal(got[1].indices, indices[:1].expand(6, K))
    counts = torch.zeros(6, K, dtype=torch.int32)
    counts[:, 0] = K
    with TeacherCache(tmp_path / "sample", mode="sample", k=K, temperature=T, vocab_size=V) as cache:
        cache.write_samples(0, counts.t().contiguous().t(), torch.arange(K, dtype=torch.int32).expand(6, K))
    assert torch.equal(TeacherCache(tmp_path / "sample")[0].indices, torch.arange(K, dtype=torch.int32).expand(6, K))


def test_unwritable_directory(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    cache = TeacherCache(tmp_path / "file" / "cache", k=K, temperature=T, vocab_size=V)
    cache.write(0, logits_batch(1, 5, 0)[0])
    with pytest.raises(CacheError, match="cannot create the lock of the cache directory"):
        cache.flush()
    assert cache.num_tokens == 5  # still buffered


# A real full disk: a 256 KiB tmpfs mounted in a user + mount namespace; writes until a flush fails.
FULL_DISK = r"""
import json, os, subprocess, sys
import torch
from kdops.cache import CacheError, TeacherCache
root = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "none", root], check=True)
path = os.path.join(root, "cache")
cache = TeacherCache(path, k=8, temperature=2.0, vocab_size=50, shard_tokens=10 ** 9)
committed, error = [], None
for n in range(1000):
    ids = [2 * n, 2 * n + 1]
    cache.write(ids, torch.randn(2, 5, 50))
    try:
        cache.flush()
    except CacheError as e:
        error = str(e)
        break
    committed += ids
reopened = TeacherCache(path)
reopened.verify_all()
manifest = json.load(open(os.path.join(path, "manifest.json")))
names = {"manifest.json", ".lock"} | {f["name"] for s in manifest["shards"] for f in s["files"].values()}
print(json.dumps({"error": error, "committed": committed, "reopened": sorted(reopened.example_ids()),
                  "stray": sorted(set(os.listdir(path)) - names)}))
"""


def test_real_full_disk(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "none", str(tmp_path)], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode().strip()}")
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["error"] and "No space left on device" in report["error"]
    assert "nothing was committed" in report["error"]
    assert len(report["committed"]) > 2 and report["reopened"] == report["committed"] and report["stray"] == []


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random corruption: flipped bits, a random byte, a truncation, an insertion, a deletion."""
    data = bytearray(data)
    at = int(rng.integers(0, max(len(data), 1)))
    kind = int(rng.integers(0, 5))
    if kind == 0:
        data[at] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:
        data[at] = int(rng.integers(0, 256))
    elif kind == 2:
        del data[at:]
    elif kind == 3:
        data[at:at] = rng.bytes(int(rng.integers(1, 9)))
    else:
        del data[at:at + int(rng.integers(1, 9))]
    return bytes(data)


def _replace_bytes(path, data):
    tmp = path.with_name(path.name + ".fuzz")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a new inode: the pages mapped by earlier readers stay valid


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_fuzzed_bytes_never_read_wrong(tmp_path, mode):
    """Hundreds of random corruptions of the manifest or a shard file: opening and reading the
    cache either raises CacheError or returns exactly the original targets (a corruption that
    changes nothing, e.g. in the manifest's whitespace), never another error or other data."""
    reference_cache(tmp_path, mode)
    reference = TeacherCache(tmp_path)
    want = {e: [t.clone() for t in reference[e]] for e in reference.example_ids()}
    originals = {p: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".lock"}
    files = sorted(originals)
    rng = np.random.default_rng(torch.randint(0, 2**31, ()).item())
    outcomes = {"error": 0, "same": 0}
    for _ in range(400):
        target = tmp_path / "manifest.json" if rng.random() < 0.5 else files[int(rng.integers(0, len(files)))]
        _replace_bytes(target, _mutate(originals[target], rng))
        try:
            cache = TeacherCache(tmp_path)
            got = {e: list(cache[e]) for e in cache.example_ids()}
        except CacheError:
            outcomes["error"] += 1
        else:
            assert got.keys() == want.keys()
            for e in want:
                assert all(torch.equal(a, b) for a, b in zip(got[e], want[e])), (target.name, e)
            outcomes["same"] += 1
        _replace_bytes(target, originals[target])
    assert outcomes["error"] > 300, outcomes


def _open_descriptors():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_no_file_descriptors_left_open(tmp_path, mode):
    """Writing, reading (memory-mapped, 60 shards), stats, verification and the error paths keep
    no file descriptor open, while the cache is alive or after."""
    before = _open_descriptors()
    with TeacherCache(tmp_path, mode=mode, k=K, temperature=T, vocab_size=V, shard_tokens=5) as cache:
        for n in range(30):
            cache.write([2 * n, 2 * n + 1], logits_batch(2, 5, n))
    reader = TeacherCache(tmp_path)
    batch = reader.read(list(range(60)))
    reader.verify_all()
    reader.stats()
    assert len(reader.manifest["shards"]) == 60 and batch.indices.shape == (300, K)
    assert _open_descriptors() == before  # 60 shards mapped, no descriptor held
    path = tmp_path / f"shard-{reader._index[14][0]:05d}.indices.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    _replace_bytes(path, bytes(data))
    with pytest.raises(CacheError, match="corrupt"):
        TeacherCache(tmp_path)[14]
    with pytest.raises(CacheError, match="no cache"):
        TeacherCache(tmp_path / "nowhere")
    del cache, reader, batch
    gc.collect()
    assert _open_descriptors() == before


# ---- sampled soft targets (mode="sample") ----

CPU_BACKENDS = [name for name, status in kdops._dispatch.available_backends().items()
                if status.available and name != "cuda"]


def test_sampled_round_trip_and_reopening(tmp_path):
    """k draws per token with a seeded generator: the cache holds sample_targets' ids and counts
    (uint8), reads them as log(count / k) with rest -inf, appends, and refuses another mode."""
    batches = [([2 * n, 2 * n + 1], logits_batch(2, 5, n)) for n in range(3)]
    cache = build_cache(lambda x: x, batches, tmp_path, mode="sample", k=K, temperature=T, seed=7, progress=False)
    want = [[sample_targets(logits[e % 2], K, T, torch.Generator().manual_seed(example_seed(7, e)))
             for e in ids] for ids, logits in batches]  # each example its own generator
    reopened = TeacherCache(tmp_path, mode="sample")
    assert reopened.manifest["mode"] == "sample" and reopened.manifest["dtype"] == "uint8"
    assert not (tmp_path / "shard-00000.values.npy").exists() and (tmp_path / "shard-00000.counts.npy").exists()
    for e in range(6):
        counts, indices = want[e // 2][e % 2]
        got = reopened[e]
        assert torch.equal(got.indices, indices) and got.logprobs.dtype == torch.float32
        assert torch.equal(got.logprobs, torch.log(counts.float() / K))
        assert torch.equal(got.rest_logprob, torch.full((5,), -math.inf))
        assert torch.equal(cache[e].indices, indices)
    assert reopened.stats()["mode"] == "sample" and 1 <= reopened.stats()["distinct_mean"] <= K
    with pytest.raises(CacheError, match="has mode='sample'; asked for mode='topk'"):
        TeacherCache(tmp_path, mode="topk")
    with pytest.raises(CacheError, match="mode="):
        build_cache(lambda x: x, [([9], logits_batch(1, 5, 9))], tmp_path, k=K, temperature=T, progress=False)
    with pytest.raises(CacheError, match="write_topk adds to a mode='topk' cache"):
        reopened.write_topk(9, *topk_targets(logits_batch(1, 5, 9)[0], K, T))
    with TeacherCache(tmp_path, mode="sample", k=K, temperature=T, vocab_size=V, seed=8) as appended:
        appended.write([6], logits_batch(1, 5, 6))
    assert sorted(TeacherCache(tmp_path).example_ids()) == list(range(7))
    topk = TeacherCache(tmp_path / "topk", k=K, temperature=T, vocab_size=V)
    with pytest.raises(CacheError, match="write_samples adds to a mode='sample' cache"):
        topk.write_samples(0, *sample_targets(logits_batch(1, 5, 0)[0], K, T))


def test_sample_targets_distinct_ids_and_counts():
    """Every row: k distinct ids in [0, V), counts >= 0 summing to k, the drawn ids (count > 0)
    first and ascending, the padding the smallest ids not drawn; also for k = V, k = 1, V = 1."""
    generator = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    for vocab, k, scale in [(50, 8, 3.0), (7, 7, 1.0), (5, 1, 1.0), (1, 1, 1.0), (300, 256, 0.1), (20, 6, 30.0)]:
        logits = torch.randn(3, 11, vocab, generator=generator) * scale
        logits[0, 0, : vocab // 2] = -math.inf
        counts, indices = sample_targets(logits, k, 1.5, generator)
        assert counts.shape == indices.shape == (3, 11, k) and counts.dtype == indices.dtype == torch.int32
        assert (counts.sum(-1) == k).all() and (counts >= 0).all()
        assert (indices.sort(-1).values.diff(dim=-1) > 0).all() and indices.min() >= 0 and indices.max() < vocab
        for c, i, row in zip(counts.reshape(-1, k), indices.reshape(-1, k), logits.reshape(-1, vocab)):
            drawn = int((c > 0).sum())
            assert (c[:drawn] > 0).all() and (i[:drawn].diff() > 0).all()
            assert torch.isfinite(row[i[:drawn].long()]).all()  # never an id of probability 0
            unused = [v for v in range(vocab) if v not in set(i[:drawn].tolist())]
            assert i[drawn:].tolist() == unused[: k - drawn]
    assert (counts.new_tensor(sample_targets(torch.zeros(0, 4), 2, 1.0)[0].shape) == torch.tensor([0, 2])).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sampled_targets_are_the_empirical_distribution(tmp_path, backend):
    """The sparse loss on a sampled cache (rest_mass="ignore") equals dense forward KL against
    the empirical distribution counts / k (-inf elsewhere): the count-0 padding ids contribute
    nothing, in loss and gradient, on every backend."""
    teacher = logits_batch(2, 6, torch.randint(0, 2**31, ()).item())
    with TeacherCache(tmp_path, mode="sample", k=K, temperature=T, vocab_size=V, seed=3) as cache:
        cache.write([0, 1], teacher)
    soft = TeacherCache(tmp_path).read([0, 1])
    assert (soft.logprobs == -math.inf).any()  # some padding to get right
    empirical = torch.full((12, V), -math.inf, dtype=torch.float64)
    empirical.scatter_(1, soft.indices.long(), soft.logprobs.double())
    student = torch.randn(12, V, dtype=torch.float64)
    s1, s2 = student.clone().float().requires_grad_(), student.clone().requires_grad_()
    got = kdops.sparse_distill_loss(s1, soft.logprobs, soft.indices, temperature=T, backend=backend)
    want = kdops.reference.distill_loss(s2, T * empirical, temperature=T)
    got.backward(), want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-5, atol=1e-7)


# not the Triton interpreter (minutes for these 4800 rows): the test above shows that every backend's
# loss is forward KL against counts / k, and that distribution's mean is the teacher's
@pytest.mark.parametrize("backend", [name for name in CPU_BACKENDS if name != "triton"])
def test_sampled_gradient_is_unbiased_topk_is_not(tmp_path, backend):
    """Forward-KL gradients from M = 1600 independent samples (k = 4 draws per token: one example each) of
    one teacher: their mean is the dense gradient within 5 standard errors at every entry (a
    z-test), while top-4 targets ("ignore" or "bucket" rest) and draws at the wrong temperature
    miss it by far more."""
    M, N, vocab, k = 1600, 3, 20, 4  # over 40 seeds: max |z| 3.6; top-k / T=1 draws: |z| >= 16 somewhere
    teacher = torch.randn(N, vocab)
    student = torch.randn(N, vocab)
    seed = torch.randint(0, 2**31, ()).item()
    dense_student = student.double().requires_grad_()
    kdops.reference.distill_loss(dense_student, teacher.double(), temperature=T, reduction="sum").backward()
    dense = dense_student.grad

    def gradient(logprobs, indices, rest_mass="ignore", copies=M):
        x = student.repeat(copies, 1).requires_grad_()
        kdops.sparse_distill_loss(x, logprobs, indices, temperature=T, rest_mass=rest_mass, reduction="sum",
                                  backend=backend).backward()
        return x.grad.double().reshape(copies, N, vocab)

    def sampled(path, temperature):
        with TeacherCache(path, mode="sample", k=k, temperature=temperature, vocab_size=vocab, seed=seed) as cache:
            cache.write(list(range(M)), teacher.expand(M, N, vocab))  # each example its own k draws
        soft = TeacherCache(path).read(list(range(M)))
        return gradient(soft.logprobs, soft.indices)

    draws = sampled(tmp_path / "sampled", T)
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(M)
    assert (stderr > 0).all()
    z = ((mean - dense) / stderr).abs()
    assert z.max() < 5, f"max |z| = {z.max():.2f}"
    values, indices, rest = topk_targets(teacher, k, T)
    for rest_mass in ("ignore", "bucket"):
        biased = gradient(values, indices, rest_mass, copies=1)[0]
        assert ((biased - dense) / stderr).abs().max() > 10, rest_mass
    wrong = sampled(tmp_path / "wrong-temperature", 1.0).mean(0)  # draws at T=1 used as T's targets
    assert ((wrong - dense) / stderr).abs().max() > 10


def test_sampled_bad_input(tmp_path):
    def create(**options):
        settings = dict(mode="sample", k=K, temperature=T, vocab_size=V) | options
        return TeacherCache(tmp_path / "new", **settings)

    for options, name in [({"k": 0}, "k must be"), ({"k": -3}, "k must be"), ({"k": 2.5}, "k must be"),
                          ({"k": V + 1}, "k must be"), ({"temperature": 0.0}, "temperature must be"),
                          ({"temperature": -1.0}, "temperature must be"), ({"temperature": math.inf}, "temperature"),
                          ({"mode": "topp"}, "mode must be one of"),
                          ({"dtype": "float32"}, "dtype applies to mode='topk'"),
                          ({"seed": 1.5}, "seed must be")]:
        with pytest.raises(ValueError, match=name):
            create(**options)
    for options, name in [({"k": 0}, "k must be"), ({"temperature": 0}, "temperature must be"),
                          ({"mode": "x"}, "mode")]:
        with pytest.raises(ValueError, match=name):
            build_cache(lambda x: x, [([0], logits_batch(1, 5, 0))], tmp_path / "b", **({"k": K} | options))
    cache = create()
    counts, indices = sample_targets(logits_batch(1, 5, 0)[0], K, T)
    with pytest.raises(ValueError, match="summing to k=8"):
        cache.write_samples(0, counts * 2, indices)
    with pytest.raises(ValueError, match="indices must lie in"):
        cache.write_samples(0, counts, indices + V)
    with pytest.raises(CacheError, match=r"counts and indices must be \[L, k=8\]"):
        cache.write_samples(0, counts[:, :3], indices[:, :3])


# ---- python -m kdops.cache build: from a local Transformers model directory ----

CORPUS = ["the cat sat on the mat", "a dog ran in the park and the cat ran too", "the end",
          "on the mat a cat", "dogs and cats and mats in the park on a sunny day"]


def tiny_model_dir(path):
    """A random 1-layer Llama with a WordLevel tokenizer trained on CORPUS, saved (no downloads)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size() + 3, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_build_from_model_cli(tmp_path, capfd, mode):
    """``build --model --data``: every corpus text's targets are those of the model's own logits
    (padding dropped, truncated to --max-length), with a progress bar; a rerun resumes."""
    model, tokenizer = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[:4]) + "\n\n")
    out = tmp_path / "cache"
    command = ["build", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(out), "--mode", mode,
               "--k", "4", "--temperature", "2", "--max-length", "6", "--batch-size", "3", "--seed", "5"]
    assert cache_cli(command) == 0
    captured = capfd.readouterr()
    assert "2/2 batches" in captured.err and "4 examples" in captured.out
    cache = TeacherCache(out)
    assert cache.mode == mode and cache.k == 4 and cache.vocab_size == model.config.vocab_size
    assert cache.manifest["teacher"] == "model" and sorted(cache.example_ids()) == [0, 1, 2, 3]
    for n, text in enumerate(CORPUS[:4]):
        tokens = tokenizer(text, truncation=True, max_length=6, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[0]
        got = cache[n]
        assert got.indices.shape == (tokens.shape[1], 4)
        if mode == "topk":
            values, indices, rest = topk_targets(logits, 4, 2.0)
            torch.testing.assert_close(got.logprobs.float(), values.to(torch.bfloat16).float(), rtol=0, atol=2e-2)
            assert (got.indices == indices).float().mean() > 0.9  # ties between near-equal logits may swap
        else:
            assert (got.logprobs.exp().sum(-1) - 1).abs().max() < 1e-6
            assert torch.isfinite(logits.gather(-1, got.indices.long())[got.logprobs > -math.inf]).all()
    (tmp_path / "more.txt").write_text("\n".join(CORPUS) + "\n")  # plain text: one example per line
    command[command.index(str(data))] = str(tmp_path / "more.txt")
    assert cache_cli(command) == 0
    assert "1/1 batches" in capfd.readouterr().err  # only the fifth text was new
    assert sorted(TeacherCache(out).example_ids()) == [0, 1, 2, 3, 4]
    assert cache_cli([str(out), "--json"]) == 0 and json.loads(capfd.readouterr().out)["mode"] == mode


def test_build_from_model_bad_input(tmp_path, capfd):
    tiny_model_dir(tmp_path / "model")
    (tmp_path / "bad.jsonl").write_text('{"text": "a cat"}\n{"txt": "no text"}\n')
    base = ["build", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "cache")]
    assert cache_cli(base + ["--data", str(tmp_path / "bad.jsonl")]) == 1
    assert 'bad.jsonl:2 has no "text" string field' in capfd.readouterr().err
    (tmp_path / "ok.txt").write_text("a cat\n")
    for extra, message in [(["--k", "0"], "k must be"), (["--temperature", "0"], "temperature must be"),
                           (["--max-length", "0"], "max_length must be"),
                           (["--batch-size", "0"], "batch_size must be")]:
        assert cache_cli(base + ["--data", str(tmp_path / "ok.txt")] + extra) == 1
        assert message in capfd.readouterr().err
    assert cache_cli(base + ["--data", str(tmp_path / "ok.txt"), "--k", "3"]) == 0
    assert cache_cli(base + ["--data", str(tmp_path / "ok.txt"), "--mode", "sample", "--k", "3"]) == 1
    assert "has mode='topk'; asked for mode='sample'" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        cache_cli(["build", "--data", "x"])  # --model is required


def test_targets_in_chunks_of_rows(tmp_path, monkeypatch):
    """write takes the targets of a few rows at a time (bounded float32 temporaries): the same
    top-k as one call over the batch; each example's draws come from its own seeded generator,
    the same whatever the batches and their order."""
    monkeypatch.setattr(kdops.cache, "TARGET_CHUNK_ELEMENTS", 7 * V)  # 7 of the 15 rows per chunk
    teacher = logits_batch(3, 5, 11)
    with TeacherCache(tmp_path / "topk", k=K, temperature=T, vocab_size=V, dtype="float32") as cache:
        cache.write([0, 1, 2], teacher)
    values, indices, rest = topk_targets(teacher, K, T)
    for e in range(3):
        got = TeacherCache(tmp_path / "topk")[e]
        assert torch.equal(got.logprobs, values[e]) and torch.equal(got.indices, indices[e])
        assert torch.equal(got.rest_logprob, rest[e])
    with TeacherCache(tmp_path / "sample", mode="sample", k=K, temperature=T, vocab_size=V, seed=2) as cache:
        cache.write([0, 1, 2], teacher)
    soft = TeacherCache(tmp_path / "sample").read([0, 1, 2])
    assert soft.indices.shape == (15, K) and torch.allclose(soft.logprobs.exp().sum(-1), torch.ones(15))
    monkeypatch.undo()  # one chunk per example, examples written one at a time in another order: same draws
    with TeacherCache(tmp_path / "again", mode="sample", k=K, temperature=T, vocab_size=V, seed=2) as cache:
        for e in (2, 0, 1):
            cache.write(e, teacher[e])
    for e in range(3):
        assert torch.equal(TeacherCache(tmp_path / "again")[e].indices, TeacherCache(tmp_path / "sample")[e].indices)
    with TeacherCache(tmp_path / "other", mode="sample", k=K, temperature=T, vocab_size=V, seed=3) as cache:
        cache.write([0, 1, 2], teacher)  # another seed: other draws
    assert not torch.equal(TeacherCache(tmp_path / "other").read([0, 1, 2]).logprobs, soft.logprobs)
