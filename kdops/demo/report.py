"""The demo's outputs: a plain-text table, ``results.json`` and a PNG of the learning curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def verdicts(results: dict) -> list[str]:
    """One honest sentence per track and distilled student: better than the baseline or not."""
    lines = []
    cls = results.get("classification")
    if cls:
        base = cls["students"]["hard labels"]["mean"]
        for name, beats in cls["distillation_beats_baseline"].items():
            got = cls["students"][name]["mean"]
            lines.append(f"classification: '{name}' {'beats' if beats else 'does NOT beat'} the hard-label "
                         f"baseline ({100 * got:.1f}% vs {100 * base:.1f}% held-out accuracy)")
        kd, extra = cls["students"]["KD"], cls["students"]["KD + SP"]
        gain = 100 * (extra["mean"] - kd["mean"])
        lines.append(f"classification: adding SP to KD changes accuracy by {gain:+.1f} points "
                     f"(seed spread {100 * max(kd['std'], extra['std']):.1f})")
    lm = results.get("language_modelling")
    if lm:
        scratch, distilled = (lm["students"][k]["perplexity"] for k in ("from scratch", "distilled"))
        lines.append(f"language modelling: the distilled student {'beats' if lm['distillation_beats_baseline'] else 'does NOT beat'} "
                     f"the one trained from scratch (held-out perplexity {distilled:.1f} vs {scratch:.1f})")
    return lines


def table(results: dict) -> str:
    """The results as a Markdown table (readable as plain text)."""
    rows = ["| track | model | params | held-out metric |", "|---|---|---:|---|"]
    cls = results.get("classification")
    if cls:
        n = len(cls["seeds"])
        rows.append(f"| classification | teacher | {cls['teacher']['parameters']:,} | "
                    f"accuracy {100 * cls['teacher']['accuracy']:.1f}% |")
        for name, s in cls["students"].items():
            rows.append(f"| classification | student, {name} | {cls['student_parameters']:,} | "
                        f"accuracy {100 * s['mean']:.1f}% ± {100 * s['std']:.1f} (n={n}) |")
    lm = results.get("language_modelling")
    if lm:
        rows.append(f"| language modelling (V={lm['vocab_size']:,}) | teacher | {lm['teacher']['parameters']:,} | "
                    f"perplexity {lm['teacher']['perplexity']:.1f} |")
        for name, s in lm["students"].items():
            rows.append(f"| language modelling (V={lm['vocab_size']:,}) | student, {name} | {s['parameters']:,} | "
                        f"perplexity {s['perplexity']:.1f} |")
    return "\n".join(rows)


def write_json(results: dict, out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def plot(results: dict, out: Path) -> Optional[Path]:
    """``learning_curves.png``: held-out accuracy per epoch (seed means) and held-out perplexity
    per step; None (after a printed note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no learning_curves.png (pip install matplotlib)")
        return None
    tracks = [k for k in ("classification", "language_modelling") if results.get(k)]
    fig, axes = plt.subplots(1, len(tracks), figsize=(6 * len(tracks), 4), squeeze=False)
    for ax, track in zip(axes[0], tracks):
        r = results[track]
        if track == "classification":
            ax.axhline(r["teacher"]["accuracy"], color="gray", linestyle="--", label="teacher")
            for name, s in r["students"].items():
                ax.plot(range(1, len(s["curve_mean"]) + 1), s["curve_mean"], label=f"student, {name}")
            ax.set(xlabel="epoch", ylabel="held-out accuracy", title=f"classification (mean of {len(r['seeds'])} seeds)")
        else:
            ax.axhline(r["teacher"]["perplexity"], color="gray", linestyle="--", label="teacher")
            for name, s in r["students"].items():
                steps, ppl = zip(*s["curve"])
                ax.plot(steps, ppl, label=f"student, {name}")
            ax.set(xlabel="step", ylabel="held-out perplexity", yscale="log",
                   title=f"language modelling (V={r['vocab_size']:,})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
