"""Markdown tables and PNG plots of kdops.bench results, and the performance page built from every
result file of a folder (``python -m kdops.bench report``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from kdops.bench.measure import describe_machine
from kdops.bench.workloads import BASELINE, OPS

SUITE = "kdops.bench"  # the "suite" field of the JSON files this package writes


def _number(x: Optional[float], digits: int = 1) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ratio(x: Optional[float], digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}x"


def header(result: dict) -> list[str]:
    """The lines naming the command, the machine, the versions and the date of a run."""
    m = result["machine"]
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "triton", "kdops", "cuda") if k in m)
    command = result.get("command")
    lines = [f"- command: `{command}`" if command else
             f"- command: not recorded (written by `benchmarks/bench_{result.get('benchmark', '?')}.py`)",
             f"- machine: {describe_machine(m)}; {versions}; {m.get('date', '?')}"]
    settings = result.get("settings")
    if settings:
        lines.append(f"- {settings['repeats']} repeats after {settings['warmup']} warm-up calls, medians; "
                     f"peak memory: {settings['memory']}")
    return lines


def op_table(result: dict, op: str) -> str:
    """The Markdown table of one op's rows of a kdops.bench result."""
    cpu_torch = any("torch_peak_mib" in r for r in result["rows"] if r["op"] == op)
    columns = ["dtype", "shape", "method", "fwd ms", "fwd+bwd ms", f"speed-up fwd / fwd+bwd vs {BASELINE}",
               "peak extra MiB", f"memory vs {BASELINE}"]
    if any("peak_extra_logits" in r for r in result["rows"] if r["op"] == op):
        columns.append("peak extra (logits-sized)")
    if cpu_torch:
        columns.append("torch allocator peak MiB")
    rule = "|" + "|".join("---" if i < 3 else "---:" for i in range(len(columns))) + "|"
    lines = ["| " + " | ".join(columns) + " |", rule]
    for r in result["rows"]:
        if r["op"] != op:
            continue
        cells = [r["dtype"], f"`{r['shape']}`", r["method"]]
        if "error" in r:
            cells += [r["error"]] + [""] * (len(columns) - 4)
        else:
            speedups = " / ".join(_ratio(r.get(k)) or "-" for k in ("speedup_fwd", "speedup_fwd_bwd"))
            cells += [_number(r.get("fwd_ms"), 2), _number(r.get("fwd_bwd_ms"), 2), speedups,
                      _number(r.get("peak_extra_mib")), _ratio(r.get("memory_ratio"), 3)]
            if "peak extra (logits-sized)" in columns:
                cells.append(_number(r.get("peak_extra_logits"), 2))
            if cpu_torch:
                cells.append(_number(r.get("torch_peak_mib")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ops_of(result: dict) -> list[str]:
    return list(dict.fromkeys(r["op"] for r in result["rows"]))


def markdown(result: dict, level: int = 2) -> str:
    """A kdops.bench result as Markdown: the run's header, then one table per op, then notes."""
    hashes = "#" * level
    parts = ["\n".join(header(result))]
    for op in _ops_of(result):
        title = OPS[op].title if op in OPS else op
        parts.append(f"{hashes} {op}: {title}\n\n{op_table(result, op)}")
    extra = result.get("notes", []) + result.get("checks", [])
    if extra:
        parts.append("\n".join(f"- {line}" for line in extra))
    return "\n\n".join(parts) + "\n"


def _rows_table(rows: list[dict]) -> str:
    """Rows of any keys as a Markdown table: every key a column."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for k in columns:
            v = r.get(k, "")
            cells.append((f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}") if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def legacy_markdown(result: dict) -> str:
    """A result file of another shape (the rows of the studies in ``benchmarks/``): every key a
    column, then each of its named ``tables`` (title -> rows), if any."""
    parts = ["\n".join(header(result)), _rows_table(result["rows"])]
    parts += [f"{title}:\n\n{_rows_table(rows)}" for title, rows in result.get("tables", {}).items() if rows]
    return "\n\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> Optional[str]:
    """Writes a PNG of a run: for each op, the forward+backward speed-up and the peak-memory ratio
    against torch-eager per shape and method (linear scales from 0, a line at 1). Returns None, or
    why no plot was written (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install matplotlib)"
    ops = _ops_of(result)
    fig, axes = plt.subplots(len(ops), 2, figsize=(12, 3.4 * len(ops)), squeeze=False)
    for (ax_time, ax_mem), op in zip(axes, ops):
        rows = [r for r in result["rows"] if r["op"] == op and "error" not in r]
        groups = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows))
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            by_group = {f"{r['shape']}\n{r['dtype']}": r for r in rows if r["method"] == method}
            for ax, key in ((ax_time, "speedup_fwd_bwd"), (ax_mem, "memory_ratio")):
                picked = [(g, by_group[name][key]) for g, name in enumerate(groups)
                          if name in by_group and by_group[name].get(key) is not None]
                ax.bar([g + i * width for g, _ in picked], [v for _, v in picked], width, label=method,
                       color=f"C{i}")
        for ax, what in ((ax_time, "speed-up fwd+bwd (higher is better)"),
                         (ax_mem, "peak memory ratio (lower is better)")):
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
            ax.set_title(f"{op}: {what} vs {BASELINE}", fontsize=10)
        ax_time.legend(fontsize=7)
    fig.suptitle(f"{describe_machine(result['machine'])}, {result['machine'].get('date', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def results_page(results_dir: Path) -> str:
    """The performance page: every ``*.json`` result of ``results_dir``, grouped by benchmark,
    newest first, each table naming its command and machine (and linking its plot)."""
    results = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and isinstance(result.get("rows"), list) and "machine" in result:
            results.append((path, result))
    results.sort(key=lambda pr: pr[1]["machine"].get("date", ""), reverse=True)
    results.sort(key=lambda pr: pr[1].get("benchmark", ""))
    lines = [
        "# kdops performance",
        "",
        f"Generated by `python -m kdops.bench report` from the result files in this folder; do not edit "
        f"by hand. Methods: `{BASELINE}` is the loss written in plain PyTorch and the baseline of every "
        "ratio (speed-up = its time / the method's time; memory = the method's peak / its peak, "
        "measured in the same run); `torch-compile` is `torch.compile` of `kdops.reference`; "
        "`kdops-<backend>` is kdops on that backend (`:torch` where that backend has no kernels of "
        "the family yet, so the reference ran). Peak memory is above the inputs: the CUDA "
        "allocator's peak on GPU; on CPU the process's peak resident set (`VmHWM`, which sees "
        "native scratch too; a few MiB of noise) and, in its own column, the peak of torch's CPU "
        "allocator (tensors only).",
    ]
    for path, result in results:
        if not result["rows"]:
            continue
        lines += ["", f"## {result.get('benchmark', path.stem)}: `{path.name}`", ""]
        if result.get("suite") == SUITE:
            lines.append(markdown(result, level=3).rstrip())
        else:
            lines.append(legacy_markdown(result).rstrip())
        png = path.with_suffix(".png")
        if png.exists():
            lines += ["", f"![{path.stem}]({png.name})"]
    return "\n".join(lines) + "\n"


def write_results_page(results_dir: Path, out: Optional[Path] = None) -> Path:
    """Writes :func:`results_page` of ``results_dir`` to ``out`` (default: its README.md)."""
    out = out or results_dir / "README.md"
    out.write_text(results_page(results_dir))
    return out
