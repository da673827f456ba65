"""Fail-fast kdops.distributed: ranks that disagree on the call are stopped by a ValueError naming
what differs, on every rank, before any collective could deadlock or mix them; a rank that dies or
raises mid-step makes the others fail with a clear error within a bounded time (spawned gloo groups
of 2 on loopback; each child writes what it saw to a JSON file the parent reads)."""
import json
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from kdops import distributed as kdist

from conftest import spawn_ranks

WORLD = 2
STALL_TIMEOUT_S = 4  # the group's timeout in the stall case: the bound on the survivor's wait
JOIN_TIMEOUT_S = 60


def _inputs(rank, rows=6, vocab=8, dtype=torch.float32):
    """The same rows and labels on every rank (seeded), this rank's half of the vocabulary."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(rows, vocab, generator=g, dtype=dtype)
    teacher = torch.randn(rows, vocab, generator=g, dtype=dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[1] = -100
    cols = slice(rank * vocab // 2, (rank + 1) * vocab // 2)
    return student[:, cols].contiguous().requires_grad_(True), teacher[:, cols].contiguous(), labels


# case -> (this rank's call, the substring every rank's ValueError must hold)
def _logits_call(rank, **overrides):
    student, teacher, labels = _inputs(rank, **{k: overrides.pop(k) for k in ("rows", "dtype") if k in overrides})
    if "labels" in overrides:
        labels = overrides.pop("labels")(labels)
    return lambda: kdist.vocab_parallel_distill_loss(student, teacher, labels, **overrides)


def _fused_call(rank, **overrides):
    g = torch.Generator().manual_seed(0)
    h, th = torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    w, tw = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    cols = slice(rank * 4, rank * 4 + 4)
    return lambda: kdist.vocab_parallel_fused_linear_distill_loss(
        h.requires_grad_(True), w[cols].clone().requires_grad_(True), th, tw[cols], **overrides)


MISMATCHES = {
    "temperature": (lambda r: _logits_call(r, temperature=2.0 + r), "temperature"),
    "divergence": (lambda r: _logits_call(r, divergence=["forward_kl", "jsd"][r]), "divergence"),
    "hard_weight": (lambda r: _logits_call(r, hard_weight=0.1 * r), "hard_weight"),
    "T^2 scaling": (lambda r: _logits_call(r, scale_by_temperature_squared=r == 0), "scale_by_temperature_squared"),
    "rows": (lambda r: _logits_call(r, rows=6 + r), "number of rows"),
    "dtype": (lambda r: _logits_call(r, dtype=[torch.float32, torch.float64][r]), "dtype"),
    "counted rows": (lambda r: _logits_call(r, labels=lambda y: y if r == 0 else y.clone().fill_(-100)),
                     "number of counted rows"),
    "labels": (lambda r: _logits_call(r, labels=lambda y: y if r == 0 else y.roll(1)), "labels"),
    "vocabulary split": (lambda r: _logits_call(r, vocab_start=[0, 3][r]), "vocab_start"),
    "vocab_start on one rank": (lambda r: _logits_call(r, vocab_start=[0, None][r]), "vocab_start"),
    "fused reduction": (lambda r: _fused_call(r, reduction=["mean", "none"][r]), "reduction"),
    "fused temperature": (lambda r: _fused_call(r, temperature=1.0 + r), "temperature"),
}


def _mismatch_worker(rank, world, port, out_dir):
    seen = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
        for name, (call, _) in MISMATCHES.items():
            try:
                call(rank)()
                seen[name] = "no error"
            except ValueError as error:
                seen[name] = f"ValueError: {error}"
        loss = _logits_call(rank)()  # the group still works after every refused call
        loss.backward()
        seen["agreeing call"] = float(loss)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        seen["setup"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def _fault_worker(rank, world, port, out_dir, fault):
    """Rank 1 fails in the middle of a step (after the fingerprint, at the first all-reduce):
    ``die`` exits the process; ``stall`` raises, and the process lives on (caught, sleeping)."""
    seen = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=STALL_TIMEOUT_S))
        if rank == 1:
            def failing_all_reduce(*_args, **_kwargs):
                if fault == "die":
                    os._exit(3)
                raise RuntimeError("a user error on rank 1 in the middle of the step")

            kdist._all_reduce = failing_all_reduce
            try:
                _logits_call(rank)()
            except RuntimeError:
                time.sleep(STALL_TIMEOUT_S + 3)  # alive, but never reaches the collective
            return
        start = time.monotonic()
        try:
            _logits_call(rank)()
            seen["error"] = None
        except Exception as error:  # noqa: BLE001
            seen["error"] = f"{type(error).__name__}: {error}"
        seen["seconds"] = time.monotonic() - start
    except Exception:  # noqa: BLE001
        seen["setup"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    os._exit(0)  # no destroy_process_group: the peer is gone


@pytest.fixture(scope="module")
def mismatches(tmp_path_factory):
    seen = spawn_ranks(_mismatch_worker, WORLD, tmp_path_factory.mktemp("mismatch"), join_timeout_s=JOIN_TIMEOUT_S,
                       must_report=range(WORLD))
    for rank in range(WORLD):
        assert "setup" not in seen[rank], seen[rank]
    return seen


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_disagreeing_ranks_raise_naming_the_option(mismatches, case):
    expected = MISMATCHES[case][1]
    for rank in range(WORLD):
        message = mismatches[rank][case]
        assert message.startswith("ValueError") and expected in message, f"rank {rank}: {message}"


def test_group_works_after_refused_calls(mismatches):
    assert mismatches[0]["agreeing call"] == mismatches[1]["agreeing call"]


@pytest.mark.parametrize("fault", ["die", "stall"])
def test_failing_rank_stops_the_others_in_bounded_time(tmp_path, fault):
    """The survivor gets a RuntimeError that names the failed collective and the likely cause
    within the group's timeout (a dead peer: at once, its connection closes)."""
    seen = spawn_ranks(_fault_worker, WORLD, tmp_path, fault, join_timeout_s=JOIN_TIMEOUT_S, must_report=(0,))
    survivor = seen[0]
    assert "setup" not in survivor, survivor["setup"]
    assert survivor["error"] is not None and survivor["error"].startswith("RuntimeError"), survivor
    assert "kdops.distributed" in survivor["error"] and "another rank" in survivor["error"], survivor["error"]
    assert survivor["seconds"] < STALL_TIMEOUT_S + 5, survivor
