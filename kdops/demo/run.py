"""Command line of ``python -m kdops.demo``: runs the chosen tracks, prints the table and the
verdicts, writes the files."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import kdops
from kdops.demo import attention_relation, classification, encoder, language_model, recipe_tracks, report
from kdops.demo.common import pick_device

LM_TRACKS = {
    "language-model": language_model.run,
    "on-policy": recipe_tracks.on_policy,
    "sequence-level": recipe_tracks.sequence_level,
    "quantized": recipe_tracks.quantized,
    "preference": recipe_tracks.preference,
    "sampled-cache": recipe_tracks.sampled_cache,
    "attention-relation": attention_relation.run,
}
TRACKS = ("classification", *LM_TRACKS, "encoder")
# the default finishes in minutes on 2 cores; each recipe track adds about as much as the
# language-model track (3 seeds x 1-2 students), so they are asked for by name or with "all"
DEFAULT_TRACKS = ("classification", "language-model")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device, threads: int) -> dict:
    """What the numbers were measured on."""
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads_used": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kdops": kdops.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backends": {k: v.available for k, v in kdops.available_backends().items()},
    }


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kdops.demo", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke test of a few seconds")
    p.add_argument("--out", type=Path, default=Path("demo_results"), help="output folder (default demo_results/)")
    p.add_argument("--tracks", nargs="+", default=list(DEFAULT_TRACKS), choices=(*TRACKS, "all"), metavar="TRACK",
                   help=f"tracks to run, of {', '.join(TRACKS)}, or all (default: {' '.join(DEFAULT_TRACKS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds of the students (default 0 1 2; --quick: 0); the LM teacher uses the first")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default=None, choices=kdops.BACKENDS,
                   help="kdops backend of the losses (default: automatic, see kdops.available_backends())")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the demo's small matrices gain little from more, "
                        "and a shared machine loses a lot to oversubscribed threads)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the demo; returns the results written to ``results.json``."""
    args = parse_args(argv)
    device = pick_device(args.device)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    cls_cfg = classification.QUICK_CLASSIFICATION if args.quick else classification.ClassificationConfig()
    lm_cfg = language_model.QUICK_LM if args.quick else language_model.LMConfig()
    encoder_cfg = encoder.QUICK_ENCODER if args.quick else encoder.EncoderConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        print(f"kdops demo on {device} ({'quick' if args.quick else 'full'} run, seeds {seeds})", flush=True)
        results = {"machine": machine(device, args.threads), "quick": args.quick, "tracks": {}}
        tracks = [t for t in TRACKS if t in args.tracks or "all" in args.tracks]
        setup = None  # the LM tracks' teacher and students, built for the first of them
        for track in tracks:
            if track in LM_TRACKS and setup is None:
                setup = language_model.LMSetup(lm_cfg, seeds[0], device, args.backend)
                results["language_model_setup"] = setup.describe()
            start_track = time.perf_counter()
            if track == "classification":
                results["tracks"][track] = classification.run(cls_cfg, seeds, device, args.backend)
            elif track == "encoder":
                results["tracks"][track] = encoder.run(encoder_cfg, seeds, device, args.backend)
            else:
                results["tracks"][track] = LM_TRACKS[track](setup, seeds)
            results["tracks"][track]["elapsed_s"] = round(time.perf_counter() - start_track, 1)
    finally:
        torch.set_num_threads(threads)
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    results["verdicts"] = report.verdicts(results)
    print()
    print(report.table(results))
    print()
    for line in results["verdicts"]:
        print(line)
    print(f"\nfinished in {results['elapsed_s']:.0f} s; wrote {report.write_json(results, args.out)}")
    for png in report.plot(results, args.out):
        print(f"wrote {png}")
    return results
