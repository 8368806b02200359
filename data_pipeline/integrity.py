"""Checking prepared MDS shards before a run reads them.

mosaicml-streaming checks a shard's hash only when it decompresses it, in a background thread
whose failure surfaces late (an empty epoch, a generic RuntimeError, or a hang), and it trusts a
decompressed ``.mds`` file left next to the ``.zstd`` one from an earlier read. So local data is
checked up front against ``index.json``: every compressed shard must exist with the recorded
size and xxh64; a decompressed copy that does not match is deleted (it is only a cache, rebuilt
from the verified compressed shard). xxh64 reads at several GB/s, so this costs little.
"""

from __future__ import annotations

import json
from pathlib import Path

import xxhash

from arch.registry import UserError

_FIX = "prepare the data again (hybridtron prepare-data --overwrite) or restore the file"


def file_xxh64(path: Path) -> str:
    """xxh64 of a file's bytes, read in 4 MiB chunks (shards and checkpoints use it)."""
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _matches(path: Path, entry: dict) -> bool:
    expected = entry.get("hashes", {}).get("xxh64")
    return path.stat().st_size == entry["bytes"] and (
        expected is None or file_xxh64(path) == expected
    )


def verify_split(split_dir: Path) -> int:
    """Check every shard of one prepared split; returns the number of samples it holds."""
    index_file = split_dir / "index.json"
    if not index_file.exists():
        raise UserError(f"{split_dir} has no index.json; {_FIX}")
    try:
        shards = json.loads(index_file.read_text())["shards"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{index_file} is corrupt ({exc}); {_FIX}") from None
    for shard in shards:
        raw = shard["raw_data"]
        zipped = shard.get("zip_data")
        if zipped is None:  # uncompressed shards: the .mds file is the data
            file = split_dir / raw["basename"]
            if not file.exists() or not _matches(file, raw):
                raise UserError(
                    f"shard {file} is missing or corrupt (size or xxh64 differs); {_FIX}"
                )
            continue
        file = split_dir / zipped["basename"]
        if not file.exists():
            raise UserError(f"shard {file} is missing; {_FIX}")
        if not _matches(file, zipped):
            raise UserError(
                f"shard {file} is corrupt (size or xxh64 differs from index.json); {_FIX}"
            )
        cached = split_dir / raw["basename"]
        if cached.exists() and not _matches(cached, raw):
            cached.unlink()
    return sum(shard["samples"] for shard in shards)
