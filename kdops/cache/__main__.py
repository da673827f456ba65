"""``python -m kdops.cache DIR`` (or ``kdops-cache DIR``): a teacher cache's manifest and statistics (tokens, k, disk
bytes per token, coverage = the kept probability mass per token). ``--verify`` checks every checksum.
``python -m kdops.cache build --model DIR --data FILE --out DIR``: builds a cache from a local Transformers model."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdops.cache import MODES, VALUE_DTYPES, CacheError, TeacherCache


def _program() -> str:
    return "kdops-cache" if Path(sys.argv[0]).name == "kdops-cache" else "python -m kdops.cache"


def build(argv: list[str]) -> int:
    """``build``: a cache of a local Transformers causal LM's soft targets over a corpus."""
    parser = argparse.ArgumentParser(
        prog=f"{_program()} build",
        description="Run a Transformers causal LM (a save_pretrained directory, with its tokenizer) over a JSONL "
                    '("text" field) or plain-text (one example per line) corpus and cache its soft targets. '
                    "Example n is the corpus' n-th text; a rerun resumes (texts already cached are skipped).")
    parser.add_argument("--model", required=True, help="the model directory (config, weights, tokenizer)")
    parser.add_argument("--data", required=True, help="the corpus: FILE.jsonl or FILE.txt")
    parser.add_argument("--out", required=True, help="the cache directory (created, or appended to)")
    parser.add_argument("--mode", choices=MODES, default="topk", help="top-k log-probabilities or k sampled draws")
    parser.add_argument("--k", type=int, default=32, help="entries (topk) or draws (sample) per token")
    parser.add_argument("--temperature", type=float, default=1.0, help="the teacher's temperature T")
    parser.add_argument("--seed", type=int, default=None, help="the sampling seed (mode sample)")
    parser.add_argument("--dtype", choices=tuple(VALUE_DTYPES), default=None,
                        help="stored top-k values (mode topk; default bfloat16)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per text at most (truncated)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per teacher forward")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    from kdops.cache.from_model import build_cache_from_model

    try:
        cache = build_cache_from_model(
            args.model, args.data, args.out, k=args.k, temperature=args.temperature, mode=args.mode, seed=args.seed,
            dtype=args.dtype, max_length=args.max_length, batch_size=args.batch_size, device=args.device,
            progress=not args.no_progress)
    except (CacheError, ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(cache)} examples, {cache.num_tokens} tokens ({cache.mode}, k={cache.k}, "
          f"T={cache.temperature}, vocab_size={cache.vocab_size})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["build"]:
        return build(argv[1:])
    parser = argparse.ArgumentParser(prog=_program(), description=__doc__,
                                     epilog=f"{_program()} build --help: building a cache from a model")
    parser.add_argument("directory", help="the cache directory (holding manifest.json); ./build for one named build")
    parser.add_argument("--verify", action="store_true", help="check every shard's SHA-256 now")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        cache = TeacherCache(args.directory, verify=True)
        if args.verify:
            cache.verify_all()
        stats = cache.stats()
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = cache.manifest
    settings = {key: m[key] for key in ("teacher", "mode", "k", "temperature", "vocab_size", "dtype")}
    if args.json:
        print(json.dumps({**settings, **stats}))
        return 0
    print(f"kdops teacher cache {args.directory}")
    for key, value in settings.items():
        print(f"  {key:<16} {value}")
    print(f"  {'examples':<16} {stats['examples']}")
    print(f"  {'tokens':<16} {stats['tokens']}")
    print(f"  {'shards':<16} {stats['shards']}")
    print(f"  {'disk':<16} {stats['disk_bytes'] / 2**20:.2f} MiB ({stats['bytes_per_token']:.1f} bytes/token)")
    if cache.mode == "sample":
        print(f"  {'distinct ids':<16} mean {stats['distinct_mean']:.2f} per token (of {m['k']} draws)")
    else:
        print(f"  {'coverage':<16} mean {stats['coverage_mean']:.4f}, min {stats['coverage_min']:.4f}, "
              f"5th percentile {stats['coverage_p5']:.4f}  (teacher probability kept in the top-{m['k']})")
    if args.verify:
        print("  checksums        ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
