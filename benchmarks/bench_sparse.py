"""Benchmark of distillation from a cached top-k teacher (kdops.cache + kdops.sparse_distill_loss)
against dense KD (kdops.distill_loss on the full teacher logits).

For each k: the disk bytes per token of a TeacherCache (bfloat16 values, int32 indices, float32
rest mass, .npy headers included) against a dense bfloat16 row of V logits; the median time of
forward + backward of the sparse loss (both rest-mass options) against the dense loss on the
same student logits; and how close the sparse losses and gradients get to the dense ones
(relative loss gap, cosine of the gradients) on a Zipf-like teacher (probability ~ rank^-1.1,
a language-model-like spread), with the teacher's coverage (mass kept in the top-k).
With ``--demo``, also the end-to-end check on the data of ``python -m kdops.demo`` (its language
model track: word-level stdlib text, V = 8192): the demo's teacher is trained, its top-k written
to a TeacherCache over the student's training windows, and students with the same initial
weights and batches are trained from scratch, with dense KD (``fused_linear_distill_loss`` on
the live teacher) and from the cache (``fused_linear_sparse_distill_loss``, rest bucket) at each
k; held-out perplexities are compared. Prints tables and writes JSON to benchmarks/results/.

    python benchmarks/bench_sparse.py                      # V = 128256, 512 tokens, k = 8 32 128
    python benchmarks/bench_sparse.py --tokens 2048 --repeats 5 --ks 32
    python benchmarks/bench_sparse.py --demo               # + the end-to-end students (minutes)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import kdops
from kdops.bench.measure import machine_info, median_seconds
from kdops.cache import TeacherCache

CPU = torch.device("cpu")


def zipf_teacher(n: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Logits whose softmax decays as rank^-1.1 (a random vocabulary order per token), plus noise."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    base = -1.1 * ranks.log()
    order = torch.argsort(torch.rand(n, vocab, generator=generator), dim=-1)
    return base[order] + 0.3 * torch.randn(n, vocab, generator=generator)


def demo_students(ks: list[int], seed: int = 0) -> dict:
    """Held-out perplexity of the demo's LM student trained from scratch, with dense KD, and from
    a top-k cache of the teacher at each k (same initial weights, same batches)."""
    import torch.nn.functional as F

    from kdops.demo import text
    from kdops.demo.language_model import LMConfig, TinyLM, perplexity, train, windows

    cfg = LMConfig()
    train_tokens, held_out_tokens = text.corpus(cfg.corpus_tokens)
    tokenizer = text.WordTokenizer(train_tokens, cfg.vocab_size)
    stream = tokenizer.encode(train_tokens)
    held_out = tokenizer.encode(held_out_tokens)[: cfg.held_out_tokens + 1]
    vocab = len(tokenizer)
    device = torch.device("cpu")
    torch.manual_seed(seed)
    teacher = TinyLM(vocab, cfg.teacher_width, cfg.teacher_layers, cfg.context)
    train(teacher, cfg.teacher_steps, cfg, seed, lambda g: windows(stream, cfg.batch_size, cfg.context + 1, g),
          lambda seq: F.cross_entropy(teacher.lm_head(teacher(seq[:, :-1])).flatten(0, 1), seq[:, 1:].flatten()),
          held_out, device, "LM teacher")
    teacher.eval().requires_grad_(False)
    # The student's training data: non-overlapping windows of its prefix, one cache example each.
    n_windows = (cfg.student_tokens - 1) // cfg.context
    ids = stream[: n_windows * cfg.context].view(n_windows, cfg.context)
    targets = stream[1: n_windows * cfg.context + 1].view(n_windows, cfg.context)
    results = {"vocab": vocab, "teacher_perplexity": perplexity(teacher, held_out, cfg.context, device)}

    def run_student(name, loss_fn):
        torch.manual_seed(seed + 1)
        student = TinyLM(vocab, cfg.student_width, cfg.student_layers, cfg.context)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.student_steps)
        g = torch.Generator().manual_seed(seed + 2)
        start = time.perf_counter()
        for _ in range(cfg.student_steps):
            batch = torch.randint(n_windows, (cfg.batch_size,), generator=g)
            loss = loss_fn(student, batch, student(ids[batch]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            schedule.step()
        results[name] = {"perplexity": perplexity(student, held_out, cfg.context, device),
                         "seconds": time.perf_counter() - start}
        print(f"  {name:<16} held-out perplexity {results[name]['perplexity']:.1f}", flush=True)

    options = dict(temperature=cfg.temperature, hard_weight=cfg.hard_weight)
    run_student("from scratch", lambda s, b, h: F.cross_entropy(s.lm_head(h).flatten(0, 1), targets[b].flatten()))
    run_student("dense KD", lambda s, b, h: kdops.fused_linear_distill_loss(
        h, s.lm_head.weight, teacher(ids[b]), teacher.lm_head.weight, targets[b], **options))
    for k in ks:
        with tempfile.TemporaryDirectory() as tmp:
            with TeacherCache(tmp, k=k, temperature=cfg.temperature, vocab_size=vocab, teacher="demo LM") as cache:
                with torch.no_grad():
                    for start in range(0, n_windows, 256):
                        rows = list(range(start, min(start + 256, n_windows)))
                        cache.write(rows, teacher.lm_head(teacher(ids[rows])))
            cache = TeacherCache(tmp)
            coverage = cache.stats()["coverage_mean"]

            def sparse(s, b, h, cache=cache):
                soft = cache.read(b.tolist())
                return kdops.fused_linear_sparse_distill_loss(
                    h, s.lm_head.weight, soft.logprobs.view(*h.shape[:2], k), soft.indices.view(*h.shape[:2], k),
                    targets[b], rest_mass="bucket", **options)

            run_student(f"top-{k} cache", sparse)
            results[f"top-{k} cache"]["coverage_mean"] = coverage
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default=None, help="kdops backend (default: automatic)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--demo", action="store_true", help="also train the demo's LM students (minutes)")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    n, vocab, T = args.tokens, args.vocab, args.temperature
    teacher = zipf_teacher(n, vocab, g)
    student = (0.8 * teacher + 0.6 * torch.randn(n, vocab, generator=g)).requires_grad_(True)
    backend = args.backend

    def dense_step():
        student.grad = None
        kdops.distill_loss(student, teacher, temperature=T, backend=backend).backward()

    dense_time = median_seconds(dense_step, CPU, args.repeats, warmup=1)
    dense_loss = kdops.distill_loss(student, teacher, temperature=T, backend=backend)
    student.grad = None
    dense_loss.backward()
    dense_loss, dense_grad = dense_loss.detach(), student.grad.clone()
    rows = []
    for k in args.ks:
        with tempfile.TemporaryDirectory() as tmp:
            with TeacherCache(tmp, k=k, temperature=T, vocab_size=vocab, dtype="bfloat16", teacher="zipf") as cache:
                for start in range(0, n, 128):
                    cache.write(list(range(start, min(start + 128, n))), teacher[start:start + 128].unsqueeze(1))
            cache = TeacherCache(tmp)
            stats = cache.stats()
            batch = cache.read(range(n))
        row = {"k": k, "disk_bytes_per_token": stats["bytes_per_token"], "coverage_mean": stats["coverage_mean"]}
        for rest_mass in ("ignore", "bucket"):
            def sparse_step():
                student.grad = None
                kdops.sparse_distill_loss(student, batch.logprobs, batch.indices, temperature=T,
                                          rest_mass=rest_mass, backend=backend).backward()

            row[f"{rest_mass}_seconds"] = median_seconds(sparse_step, CPU, args.repeats, warmup=1)
            student.grad = None
            loss = kdops.sparse_distill_loss(student, batch.logprobs, batch.indices, temperature=T, rest_mass=rest_mass,
                                             backend=backend)
            loss.backward()
            loss = loss.detach()
            row[f"{rest_mass}_loss"] = float(loss)
            row[f"{rest_mass}_loss_gap"] = float((loss - dense_loss).abs() / dense_loss.abs())
            row[f"{rest_mass}_grad_cosine"] = float(torch.nn.functional.cosine_similarity(
                student.grad.flatten(), dense_grad.flatten(), dim=0))
        rows.append(row)

    dense_bytes = 2 * vocab
    print(f"V={vocab}, {n} tokens, T={T}, float32 student, backend={backend or 'auto'}; dense KD: "
          f"{dense_bytes} B/token (bf16 logits), loss {float(dense_loss):.4f}, fwd+bwd {dense_time * 1e3:.1f} ms")
    header = (f"{'k':>4} {'B/token':>8} {'vs dense':>9} {'coverage':>9} {'ignore ms':>10} {'bucket ms':>10} "
              f"{'speedup':>8} {'gap ign':>8} {'gap bkt':>8} {'cos ign':>8} {'cos bkt':>8}")
    print(header)
    for r in rows:
        print(f"{r['k']:>4} {r['disk_bytes_per_token']:>8.1f} {dense_bytes / r['disk_bytes_per_token']:>8.0f}x "
              f"{r['coverage_mean']:>9.4f} {r['ignore_seconds'] * 1e3:>10.1f} {r['bucket_seconds'] * 1e3:>10.1f} "
              f"{dense_time / r['bucket_seconds']:>7.2f}x {r['ignore_loss_gap']:>8.4f} {r['bucket_loss_gap']:>8.4f} "
              f"{r['ignore_grad_cosine']:>8.4f} {r['bucket_grad_cosine']:>8.4f}")
    dense_row = {"k": f"{vocab} (dense)", "disk_bytes_per_token": dense_bytes, "coverage_mean": 1.0,
                 "dense_seconds": dense_time, "dense_loss": float(dense_loss)}
    info = machine_info(CPU)
    result = {
        "benchmark": "sparse", "command": " ".join(["python", "benchmarks/bench_sparse.py", *sys.argv[1:]]),
        "machine": info, "vocab": vocab, "tokens": n, "temperature": T, "backend": backend or "auto",
        "rows": [dense_row, *rows], "tables": {},
    }
    if args.demo:
        print("end-to-end, kdops.demo language-model data (V = 8192):")
        demo = demo_students(args.ks)
        title = (f"end-to-end students on the kdops.demo language-model data (V = {demo.pop('vocab')}), "
                 f"teacher perplexity {demo.pop('teacher_perplexity'):.1f}")
        result["tables"][title] = [{"student": name, **values} for name, values in demo.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sparse-cpu-{info['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
