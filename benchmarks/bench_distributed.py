"""Benchmark of kdops.distributed.vocab_parallel_distill_loss on CPU / gloo (loopback).

For each world size W the script spawns W processes; each holds a contiguous V / W slice of the
vocabulary of ``[N, V]`` float32 student and teacher logits, and one step is forward + backward
(gradient to the student shard) of
  vocab-parallel     kdops.distributed.vocab_parallel_distill_loss: all-reduces of per-row scalars
  all-gather-logits  all-gather the student and teacher shards, kdops.distill_loss on the full
                     logits (every rank computes the whole loss), keep the gradient of the shard
Communication is counted by wrapping ``torch.distributed.all_reduce`` / ``all_gather``:
``payload`` is the bytes of the tensors each rank hands to the collectives per step, ``wire`` the
bytes each rank sends with ring algorithms (all-reduce ``2 (W-1)/W * S``, all-gather
``(W-1) * S``). Time: the median over ``--repeats`` steps (after ``--warmup`` steps) of the
slowest rank. Each rank uses ``cpu_count // W`` threads (at least 1): W = 4 on a 2-core machine
is oversubscribed.

    python benchmarks/bench_distributed.py                    # N=1024, V=32000, W = 1, 2, 4
    python benchmarks/bench_distributed.py --rows 512 --vocab 8000 --worlds 1 2 --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_kd import machine_info

import kdops
from kdops import distributed as kdist

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("vocab-parallel", "all-gather-logits")


class CollectiveCounter:
    """Wraps ``dist.all_reduce`` and ``dist.all_gather`` (as kdops.distributed calls them) and
    adds up, per rank, the calls, the bytes handed to them and the bytes sent by ring algorithms."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.reset()
        self._all_reduce, self._all_gather = dist.all_reduce, dist.all_gather
        dist.all_reduce, dist.all_gather = self.all_reduce, self.all_gather

    def reset(self) -> None:
        self.calls, self.payload, self.wire = 0, 0, 0.0

    def _add(self, nbytes: int, wire: float) -> None:
        self.calls += 1
        self.payload += nbytes
        self.wire += wire

    def all_reduce(self, tensor, *args, **kwargs):
        nbytes = tensor.numel() * tensor.element_size()
        self._add(nbytes, 2 * (self.world - 1) / self.world * nbytes)
        return self._all_reduce(tensor, *args, **kwargs)

    def all_gather(self, tensor_list, tensor, *args, **kwargs):
        nbytes = tensor.numel() * tensor.element_size()
        self._add(nbytes, (self.world - 1) * nbytes)
        return self._all_gather(tensor_list, tensor, *args, **kwargs)


def _vocab_parallel_step(student, teacher, labels, options):
    s = student.detach().requires_grad_(True)
    kdist.vocab_parallel_distill_loss(s, teacher, labels, **options).backward()
    return s.grad


def _all_gather_step(student, teacher, labels, options):
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = []
    for shard in (student, teacher):
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard.contiguous())
        gathered.append(torch.cat(parts, dim=1))
    full = gathered[0].requires_grad_(True)
    kdops.distill_loss(full, gathered[1], labels, **options).backward()
    v = student.shape[1]
    return full.grad[:, rank * v:(rank + 1) * v]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    counter = CollectiveCounter(world)
    g = torch.Generator().manual_seed(0)
    n, vocab = args.rows, args.vocab
    shard = vocab // world
    cols = slice(rank * shard, (rank + 1) * shard)
    student = torch.randn(n, world * shard, generator=g)[:, cols].contiguous() * 3
    teacher = torch.randn(n, world * shard, generator=g)[:, cols].contiguous() * 3
    labels = torch.randint(0, world * shard, (n,), generator=g)
    options = dict(temperature=2.0, divergence=args.divergence, hard_weight=args.hard_weight)
    rows = []
    for method, step in zip(METHODS, (_vocab_parallel_step, _all_gather_step)):
        for _ in range(args.warmup):
            step(student, teacher, labels, options)
        counter.reset()
        grad = step(student, teacher, labels, options)  # the counted step
        calls, payload, wire = counter.calls, counter.payload, counter.wire
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            step(student, teacher, labels, options)
            times.append(time.perf_counter() - t0)
        slowest = torch.tensor(statistics.median(times))
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # counted, but the counter is reset first
        rows.append(dict(method=method, world=world, rows=n, vocab=world * shard, vocab_shard=shard,
                         divergence=args.divergence, hard_weight=args.hard_weight,
                         fwd_bwd_ms=1e3 * float(slowest), collectives=calls,
                         payload_bytes_per_rank=payload, wire_bytes_per_rank=round(wire),
                         grad_finite=bool(grad.isfinite().all())))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out = os.path.join(tmp, f"world{world}.json")
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
            rows += json.loads(Path(out).read_text())
    by_world = {(r["world"], r["method"]): r for r in rows}
    for r in rows:
        r["payload_vs_all_gather"] = r["payload_bytes_per_rank"] / max(
            by_world[(r["world"], "all-gather-logits")]["payload_bytes_per_rank"], 1)
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'world':>5} {'method':<18} {'ms/step':>9} {'calls':>5} {'payload B/rank':>15} "
              f"{'wire B/rank':>13} {'payload ratio':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['world']:>5} {r['method']:<18} {r['fwd_bwd_ms']:>9.1f} {r['collectives']:>5} "
              f"{r['payload_bytes_per_rank']:>15,} {r['wire_bytes_per_rank']:>13,} {r['payload_vs_all_gather']:>13.2e}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="N, rows (tokens) per step")
    parser.add_argument("--vocab", type=int, default=32000, help="V, rounded down to a multiple of each W")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--hard-weight", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/distributed-cpu-DATE.json)")
    args = parser.parse_args(argv)
    rows = run(args)
    print_table(rows)
    out = args.out or RESULTS / f"distributed-cpu-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "distributed", "machine": machine_info(torch.device("cpu")),
        "command": shlex.join(["python", "benchmarks/bench_distributed.py", *argv]),
        "backend": "gloo (loopback)", "repeats": args.repeats, "warmup": args.warmup, "rows": rows,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
