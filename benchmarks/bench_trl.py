"""One distillation step of TRL's trainers' losses, stock vs patched by kdops.integrations.trl.

Models: randomly initialised Llama-style causal LMs of width ``--hidden`` (teacher 2 layers,
student 1) with a large vocabulary (``--vocab``, e.g. Llama 3's 128256, Qwen 2.5's 151936), a
batch of ``--batch`` x ``--seq`` completion tokens (``--dtype``). One step is: the teacher's
forward (no grad), the student's forward, the loss, the backward to every student parameter, on
the same inputs for every method:

  trl-chunked      TRL's DistillationTrainer loss: trl's ``_chunked_divergence_loss`` on the
                   final hidden states and ``lm_head`` weights (its chunked [4096 x 32768] path)
  trl-gkd          TRL's GKDTrainer: both models' ``[B, S, V]`` logits, ``generalized_jsd_loss``
  kdops            ``kdops.integrations.trl.chunked_divergence_loss`` (what the patched
                   DistillationTrainer runs): kdops.fused_linear_distill_loss
  kdops-gkd        the patched GKDTrainer: the same logits, kdops' ``generalized_jsd_loss``

Each (dtype, vocabulary, method) runs in a fresh process (``--worker``): time is the median of
``--repeats`` steps after ``--warmup``; memory is the step's peak above what is held before it
(the models and inputs): on CUDA the allocator's peak, on CPU the peak resident set and the peak
of torch's own allocations (profiler memory events; see kdops.bench.measure). The machine's load
average (``os.getloadavg``) before and after the run goes into the JSON: on a shared machine the
times are only as good as it. Writes ``benchmarks/results/trl-<device>-<date>.json`` and ``.md``
(``--out STEM`` elsewhere).

    python benchmarks/bench_trl.py                                  # CPU: 4 x 256 tokens, V = 128256, 151936
    python benchmarks/bench_trl.py --batch 8 --seq 512 --dtype bfloat16   # the GPU preset
    python benchmarks/bench_trl.py --batch 4 --seq 512 --vocab 32000 --hidden 1024 \
        --dtype float32 bfloat16 --methods trl-chunked kdops     # realistic token counts on CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("trl-chunked", "trl-gkd", "kdops", "kdops-gkd")
MiB = 2**20


def _models(vocab: int, hidden: int, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    teacher = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **common)).to(device, dtype).eval()
    student = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **common)).to(device, dtype)
    return teacher.requires_grad_(False), student


def _step_fn(method: str, teacher, student, input_ids, mask, beta: float, temperature: float):
    """The step of ``method``: returns a function computing forward + loss + backward, returning the loss."""
    import trl.trainer.distillation_trainer as dt
    from trl.experimental.gkd import GKDTrainer

    from kdops.integrations import trl as kd_trl

    kd_trl.unpatch()
    chunked = {"trl-chunked": dt._chunked_divergence_loss, "kdops": kd_trl.chunked_divergence_loss}.get(method)
    jsd = {"trl-gkd": GKDTrainer.generalized_jsd_loss, "kdops-gkd": kd_trl.generalized_jsd_loss}.get(method)
    labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

    def step():
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            if chunked is not None:
                t_hidden = teacher.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
            else:
                t_logits = teacher(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        if chunked is not None:
            s_hidden = student.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
            loss, _, _ = chunked(s_hidden, t_hidden, student.lm_head.weight, teacher.lm_head.weight, mask[:, 1:],
                                 beta, temperature=temperature)
        else:
            s_logits = student(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
            loss = jsd(s_logits, t_logits, labels, beta=beta, temperature=temperature)
        loss.backward()
        return loss.detach()

    return step


def worker(args: argparse.Namespace) -> dict:
    from kdops.bench.measure import (
        median_seconds,
        peak_extra_bytes,
        resident_set_supported,
        return_freed_memory,
        synchronize,
        torch_cpu_peak_bytes,
    )

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    vocab = args.vocab[0]
    freed = return_freed_memory() if device.type == "cpu" else False
    teacher, student = _models(vocab, args.hidden, dtype, device)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(vocab, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones(args.batch, args.seq, dtype=torch.long, device=device)
    mask[:, -args.seq // 8:] = 0  # some padding at the end of every sequence
    step = _step_fn(args.method, teacher, student, input_ids, mask, args.beta, args.temperature)
    loss = float(step())
    synchronize(device)
    seconds = median_seconds(step, device, repeats=args.repeats, warmup=args.warmup)
    row = {"method": args.method, "dtype": args.dtype, "vocab": vocab, "loss": loss, "ms": seconds * 1e3,
           "peak_mib": peak_extra_bytes(step, device) / MiB}
    if device.type == "cpu":
        row["peak_memory"] = "resident set" if resident_set_supported() else None
        row["torch_peak_mib"] = torch_cpu_peak_bytes(step) / MiB
        row["glibc_returns_freed_memory"] = freed
    else:
        row["peak_memory"] = "cuda allocator"
    return row


def table(rows: list[dict]) -> str:
    cpu = "torch_peak_mib" in rows[0]
    cols = ["dtype", "V", "method", "loss", "ms / step", "time / trl-chunked", "peak MiB", "peak / trl-chunked"]
    cols += ["torch peak MiB", "torch peak / trl-chunked"] if cpu else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        base = next((b for b in rows if b["vocab"] == r["vocab"] and b["dtype"] == r["dtype"]
                     and b["method"] == "trl-chunked"), r)
        ratio = lambda key: r[key] / max(base[key], 1e-9)
        line = (f"| {r['dtype']} | {r['vocab']} | {r['method']} | {r['loss']:.6f} | {r['ms']:.0f} | "
                f"{ratio('ms'):.2f} | {r['peak_mib']:.0f} | {ratio('peak_mib'):.2f} |")
        lines.append(line + (f" {r['torch_peak_mib']:.0f} | {ratio('torch_peak_mib'):.2f} |" if cpu else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.dtype = args.dtype[0]
        print(json.dumps(worker(args)))
        return

    from kdops.bench.measure import describe_machine, machine_info

    command = "python benchmarks/bench_trl.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = []
    load_before = os.getloadavg()
    for dtype in args.dtype:
        for vocab in args.vocab:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--worker", "--method", method, "--vocab", str(vocab),
                       "--dtype", dtype]
                for name in ("hidden", "batch", "seq", "beta", "temperature", "repeats", "warmup", "device"):
                    cmd += [f"--{name}", str(getattr(args, name))]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{dtype} V={vocab} {method} failed:\n{done.stderr}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"{dtype} V={vocab} {method}: {rows[-1]['ms']:.0f} ms/step, peak {rows[-1]['peak_mib']:.0f} "
                      f"MiB, loss {rows[-1]['loss']:.6f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    load_after = os.getloadavg()
    spreads = {}
    for dtype in args.dtype:
        for vocab in args.vocab:
            losses = [r["loss"] for r in rows if r["vocab"] == vocab and r["dtype"] == dtype]
            spreads[f"{dtype} V={vocab}"] = (max(losses) - min(losses)) / max(abs(statistics.mean(losses)), 1e-30)
            print(f"{dtype} V={vocab}: relative spread of the losses {spreads[f'{dtype} V={vocab}']:.1e}",
                  file=sys.stderr)
    info = machine_info(torch.device(args.device))
    for package in ("transformers", "trl"):
        info[package] = __import__(package).__version__
    info["KDOPS_BACKEND"] = os.environ.get("KDOPS_BACKEND")  # None: kdops' default for the device
    result = {"command": command, "machine": info, "date": datetime.date.today().isoformat(),
              "settings": {k: getattr(args, k) for k in ("hidden", "batch", "seq", "dtype", "beta", "temperature",
                                                          "repeats", "warmup")},
              "load_average_1_5_15_min": {"before": load_before, "after": load_after},
              "relative_loss_spread": spreads, "rows": rows}
    stem = args.out or RESULTS / f"trl-{torch.device(args.device).type}-{result['date']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = (f"# TRL losses, stock vs kdops\n\n`{command}`, {describe_machine(info)}, {result['date']}; "
            f"width {args.hidden}, {args.batch} x {args.seq} tokens ({args.seq // 8} padding per sequence), "
            f"{' / '.join(args.dtype)}, beta {args.beta}, T {args.temperature}; median of {args.repeats} steps. "
            f"One step: both forwards, the loss, the student's backward. Load average (1, 5, 15 min) before "
            f"{', '.join(f'{x:.2f}' for x in load_before)}, after {', '.join(f'{x:.2f}' for x in load_after)}."
            f"\n\n{table(rows)}\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
