"""The demo's outputs: a plain-text table, one verdict per comparison, ``results.json`` and two
PNGs (learning curves per track; final held-out perplexity and recipe metric per student)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

LM_TRACKS = ("language-model", "on-policy", "sequence-level", "quantized", "preference", "sampled-cache",
             "attention-relation")
STUDENT_TRACKS = (*LM_TRACKS, "encoder")  # the tracks of per-seed students with a recipe metric


def _stat(entry: dict, scale: float = 1.0, digits: int = 1) -> str:
    n = len(entry["values"])
    return f"{scale * entry['mean']:.{digits}f} ± {scale * entry['std']:.{digits}f} (n={n})"


def compare(track: str, a_name: str, a: dict, b_name: str, b: dict, what: str, *, lower_is_better: bool = True,
            scale: float = 1.0, digits: int = 1) -> str:
    """``track: 'a' beats / does NOT beat 'b' on what (a vs b)``; a difference within twice the
    larger seed spread, or within 1% of b, is called a tie (``is level with``)."""
    diff = a["mean"] - b["mean"]
    if abs(diff) <= max(2 * a["std"], 2 * b["std"], 0.01 * abs(b["mean"])):
        verb = "is level with"
    else:
        verb = "beats" if (diff < 0) == lower_is_better else "does NOT beat"
    return (f"{track}: '{a_name}' {verb} '{b_name}' on {what} "
            f"({_stat(a, scale, digits)} vs {_stat(b, scale, digits)})")


def _track_verdicts(name: str, r: dict) -> list[str]:
    s = r["students"]
    ppl = "held-out perplexity"
    if name == "language-model":
        return [compare(name, "distilled", s["distilled"]["perplexity"], "from scratch",
                        s["from scratch"]["perplexity"], ppl)]
    if name == "on-policy":
        a, b = "GKD (on-policy)", "supervised KD (data)"
        return [compare(name, a, s[a]["perplexity"], b, s[b]["perplexity"], ppl),
                compare(name, a, s[a]["teacher_nll"], b, s[b]["teacher_nll"], r["metric"]["name"], digits=3)]
    if name == "sequence-level":
        base = "CE on data"
        return [compare(name, other, s[other]["perplexity"], base, s[base]["perplexity"], ppl)
                for other in ("CE on teacher corpus", "CE + KD on teacher corpus")]
    if name == "quantized":
        return [compare(name, "QAT int8 + KD", s["QAT int8 + KD"]["perplexity"], "KD, then PTQ int8",
                        s["KD, then PTQ int8"]["perplexity"], f"{ppl} of the int8 model"),
                compare(name, "KD, then PTQ int8", s["KD, then PTQ int8"]["perplexity"], "KD, float",
                        s["KD, float"]["perplexity"], f"{ppl} (the cost of PTQ)")]
    if name == "preference":
        rate = r["metric"]["name"]
        tuned, ref = "KD from the tuned teacher", r["reference"]
        return [compare(name, tuned, s[tuned]["preference_rate"], other, s[other]["preference_rate"], rate,
                        lower_is_better=False, scale=100) + "; in %"
                for other in ("CE on data", "KD from the reference teacher")] + [
            f"{name}: number tokens are {100 * ref['held-out data']['preference_rate']:.1f}% of the held-out data, "
            f"{100 * ref['reference teacher']['preference_rate']:.1f}% of the reference teacher's generations and "
            f"{100 * ref['tuned teacher']['preference_rate']:.1f}% of the tuned teacher's"]
    if name == "sampled-cache":
        gaps = ", ".join(f"{cache} ({r['caches'][cache]['bytes_per_token']:.0f} B/token) {gap:+.1f}"
                         for cache, gap in r["gap_to_dense"].items())
        return [compare(name, other, s[other]["perplexity"], "dense KD", s["dense KD"]["perplexity"], ppl)
                for other in s if other != "dense KD"] + [f"{name}: held-out perplexity gap to dense KD: {gaps}"]
    if name == "attention-relation":
        a, b, trace = "KD + attention relations", "distilled", r["training_relation_loss"]
        steps = ", ".join(f"{t['first']:.3f} -> {t['last']:.3f}" for t in trace.values())
        return [compare(name, a, s[a]["perplexity"], b, s[b]["perplexity"], ppl),
                compare(name, a, s[a]["relation"], b, s[b]["relation"], r["metric"]["name"], digits=3),
                f"{name}: training relation loss from the first step to the last, per seed: {steps}"]
    if name == "encoder":
        acc, rel = "held-out masked-token accuracy", "held-out attention-relation loss to the teacher"
        pairs = [("KD", "MLM from scratch"), ("KD + attention relations", "KD"),
                 ("KD + attention relations + hints", "KD + attention relations")]
        return [compare(name, a, s[a]["accuracy"], b, s[b]["accuracy"], acc, lower_is_better=False, scale=100)
                + "; in %" for a, b in pairs] + [
            compare(name, "KD + attention relations", s["KD + attention relations"]["perplexity"], "KD",
                    s["KD"]["perplexity"], "held-out masked-token perplexity"),
            compare(name, "KD + attention relations", s["KD + attention relations"]["relation"], "KD",
                    s["KD"]["relation"], rel, digits=3)]
    raise ValueError(f"no verdicts for track {name!r}")


def verdicts(results: dict) -> list[str]:
    """One honest sentence per comparison: better than the baseline, level with it, or not."""
    lines = []
    cls = results["tracks"].get("classification")
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
    for name in STUDENT_TRACKS:
        if name in results["tracks"]:
            lines.extend(_track_verdicts(name, results["tracks"][name]))
    return lines


def table(results: dict) -> str:
    """The results as a Markdown table (readable as plain text)."""
    rows = ["| track | model | params | held-out perplexity (accuracy) | recipe metric |", "|---|---|---:|---|---|"]
    cls = results["tracks"].get("classification")
    if cls:
        n = len(cls["seeds"])
        rows.append(f"| classification | teacher | {cls['teacher']['parameters']:,} | "
                    f"accuracy {100 * cls['teacher']['accuracy']:.1f}% | |")
        for name, s in cls["students"].items():
            rows.append(f"| classification | student, {name} | {cls['student_parameters']:,} | "
                        f"accuracy {100 * s['mean']:.1f}% ± {100 * s['std']:.1f} (n={n}) | |")
    setup = results.get("language_model_setup")
    if setup:
        rows.append(f"| LM (V={setup['vocab_size']:,}) | teacher | {setup['teacher']['parameters']:,} | "
                    f"{setup['teacher']['perplexity']:.1f} | |")
    for name in LM_TRACKS:
        r = results["tracks"].get(name)
        if not r:
            continue
        metric = r.get("metric")
        scale, digits = (100, 1) if metric and metric["key"] == "preference_rate" else (1, 3)
        for ref_name, ref in r.get("reference", {}).items():
            ppl = f"{ref['perplexity']:.1f}" if "perplexity" in ref else ""
            value = f"{scale * ref[metric['key']]:.{digits}f}" if metric and metric["key"] in ref else ""
            rows.append(f"| {name} | {ref_name} | | {ppl} | {value} |")
        for student, s in r["students"].items():
            value = _stat(s[metric["key"]], scale, digits) if metric else ""
            rows.append(f"| {name} | student, {student} | {setup['student_parameters']:,} | "
                        f"{_stat(s['perplexity'])} | {value} |")
    enc = results["tracks"].get("encoder")
    if enc:
        teacher = enc["setup"]["teacher"]
        rows.append(f"| encoder (V={enc['setup']['vocab_size']:,}) | teacher | {teacher['parameters']:,} | "
                    f"{teacher['perplexity']:.1f} | {100 * teacher['accuracy']:.1f} |")
        rows.append(f"| encoder | untrained student | | | relation "
                    f"{enc['reference']['untrained student']['relation']:.3f} |")
        for student, s in enc["students"].items():
            rows.append(f"| encoder | student, {student} | {enc['student_parameters']:,} | {_stat(s['perplexity'])} | "
                        f"{_stat(s['accuracy'], 100)}; relation {_stat(s['relation'], digits=3)} |")
    percent = ("preference_rate", "accuracy")
    metrics = sorted({f"{n}: {r['metric']['name']}" + (" (%)" if r["metric"]["key"] in percent else "")
                      for n, r in results["tracks"].items() if r.get("metric")})
    return "\n".join(rows + ([""] + [f"recipe metric of {m}" for m in metrics] if metrics else []))


def write_json(results: dict, out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def plot(results: dict, out: Path) -> list[Path]:
    """``learning_curves.png`` (held-out accuracy per epoch, perplexity per step; seed means; one
    panel per track) and, with LM tracks, ``recipe_results.png`` (final perplexity and recipe
    metric per student, mean ± std); none (after a printed note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no plots (pip install matplotlib)")
        return []
    tracks = list(results["tracks"])
    cols = min(len(tracks), 4)
    rows = (len(tracks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(tracks):]:
        ax.set_visible(False)
    setup = results.get("language_model_setup")
    for ax, name in zip(axes.flat, tracks):
        r = results["tracks"][name]
        if name == "classification":
            ax.axhline(r["teacher"]["accuracy"], color="gray", linestyle="--", label="teacher")
            for student, s in r["students"].items():
                ax.plot(range(1, len(s["curve_mean"]) + 1), s["curve_mean"], label=f"student, {student}")
            ax.set(xlabel="epoch", ylabel="held-out accuracy",
                   title=f"classification (mean of {len(r['seeds'])} seeds)")
        else:
            teacher = r["setup"]["teacher"] if name == "encoder" else setup["teacher"]
            ax.axhline(teacher["perplexity"], color="gray", linestyle="--", label="teacher")
            for student, s in r["students"].items():
                if "curve" in s:
                    steps, ppl = zip(*s["curve"])
                    ax.plot(steps, ppl, label=student)
                else:
                    ax.axhline(s["perplexity"]["mean"], color="black", linestyle=":", label=f"{student} (final)")
            ax.set(xlabel="step", ylabel="held-out perplexity", yscale="log",
                   title=f"{name} (mean of {len(r['seeds'])} seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "learning_curves.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    lm = [n for n in STUDENT_TRACKS if n in results["tracks"]]
    if lm:
        fig, axes = plt.subplots(1, len(lm), figsize=(4.2 * len(lm), 4), squeeze=False)
        for ax, name in zip(axes[0], lm):
            r = results["tracks"][name]
            metric = r.get("metric")
            key = metric["key"] if metric else "perplexity"
            names = list(r["students"])
            means = [r["students"][n][key]["mean"] for n in names]
            stds = [r["students"][n][key]["std"] for n in names]
            ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue")
            ax.set_xticks(range(len(names)), [textwrap.fill(n, 14) for n in names], fontsize=7)
            ax.set(title=name, ylabel=metric["name"] if metric else "held-out perplexity")
            low, high = min(m - s for m, s in zip(means, stds)) * 0.9, max(m + s for m, s in zip(means, stds)) * 1.05
            if high > low:  # not all 0 (a quick run's accuracies)
                ax.set_ylim(low, high)
            ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        paths.append(out / "recipe_results.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
