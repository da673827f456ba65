"""``python -m kdops.cache DIR`` (or ``kdops-cache DIR``): a teacher cache's manifest and statistics (tokens, k, disk bytes
per token, coverage = the kept probability mass per token). ``--verify`` checks every checksum."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdops.cache import CacheError, TeacherCache


def main(argv: list[str] | None = None) -> int:
    prog = "kdops-cache" if Path(sys.argv[0]).name == "kdops-cache" else "python -m kdops.cache"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("directory", help="the cache directory (holding manifest.json)")
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
    settings = {key: m[key] for key in ("teacher", "k", "temperature", "vocab_size", "dtype")}
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
    print(f"  {'coverage':<16} mean {stats['coverage_mean']:.4f}, min {stats['coverage_min']:.4f}, "
          f"5th percentile {stats['coverage_p5']:.4f}  (teacher probability kept in the top-{m['k']})")
    if args.verify:
        print("  checksums        ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
