"""Checkpoint integrity hashing: xxh64 (what checkpoints use) vs sha256, on a checkpoint-sized file.

    .venv/bin/python benchmarks/bench_checkpoint_hash.py [--mb 256]

Every checkpoint file is hashed when written and again when verified on resume, so the hash is
on the save/restore path of every run. Prints one JSON line with both throughputs and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time

import xxhash


def throughput(path: str, make_hash, repeats: int) -> float:
    size = os.path.getsize(path)
    best = float("inf")
    for _ in range(repeats):
        h = make_hash()
        start = time.perf_counter()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.hexdigest()
        best = min(best, time.perf_counter() - start)
    return size / best / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(args.mb << 20))
        f.flush()
        xxh = throughput(f.name, xxhash.xxh64, args.repeats)
        sha = throughput(f.name, hashlib.sha256, args.repeats)
    print(
        json.dumps(
            {
                "file_mb": args.mb,
                "xxh64_MB_per_s": round(xxh),
                "sha256_MB_per_s": round(sha),
                "speedup_xxh64_over_sha256": round(xxh / sha, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
