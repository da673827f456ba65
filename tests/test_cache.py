"""kdops.cache.TeacherCache: bit-exact round trips, appending, corruption and mismatch errors,
concurrent readers and writers, the CLI, and distillation from a cache."""
import importlib.metadata
import json
import math
import multiprocessing
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

import kdops
from kdops.cache import CacheError, TeacherCache, build_cache, topk_targets
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
