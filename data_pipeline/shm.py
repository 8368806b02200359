"""Cleaning up mosaicml-streaming's shared memory after a run that was killed.

Each StreamingDataset claims a numeric prefix and creates shared-memory blocks (``/dev/shm``)
and file locks (in the temp dir) named after it. A clean exit removes them; a killed process
group (``kill -9``, an OOM kill, a pre-empted node) leaves them behind, and streaming then skips
those prefixes forever or, with a remote, refuses the reused local directory. Streaming's own
``clean_stale_shared_memory()`` deletes every prefix, live ones too. Here a prefix is stale when
its blocks belong to this user and no process of this user maps them (``/proc/*/maps``): a live
dataset keeps its blocks mapped for its whole life. Linux only; elsewhere nothing is removed.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_SHM_NAMES = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states",
              "shard_access_times", "resume", "epoch_shape", "epoch_data")  # fmt: skip
_FILELOCKS = ("barrier_filelock", "cache_filelock")
_BLOCK = re.compile(r"^(\d{6})_(" + "|".join(_SHM_NAMES) + r")$")
_MAPPED = re.compile(r"/dev/shm/(\d{6})_")


def _mapped_prefixes(uid: int) -> set[str] | None:
    """Prefixes mapped by any process of ``uid``; None when that cannot be known."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    mapped: set[str] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            mapped.update(_MAPPED.findall((entry / "maps").read_text()))
        except OSError:  # the process ended meanwhile, or is not readable
            continue
    return mapped


def clean_stale() -> list[str]:
    """Remove this user's streaming blocks and locks that no live process maps; returns them."""
    if not SHM_DIR.is_dir():
        return []
    uid = os.getuid()
    blocks: dict[str, list[Path]] = {}
    for path in SHM_DIR.iterdir():
        match = _BLOCK.match(path.name)
        if match:
            try:
                if path.stat().st_uid == uid:
                    blocks.setdefault(match.group(1), []).append(path)
            except OSError:
                continue
    if not blocks:
        return []
    mapped = _mapped_prefixes(uid)
    if mapped is None:
        return []
    removed: list[str] = []
    for prefix, paths in blocks.items():
        if prefix in mapped:
            continue
        for path in paths:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        for lock in _FILELOCKS:
            lock_path = Path(tempfile.gettempdir()) / f"{prefix}_{lock}"
            if lock_path.exists():
                lock_path.unlink(missing_ok=True)
                removed.append(str(lock_path))
    return removed


def release(dataset: object) -> None:
    """Give back a StreamingDataset's shared memory now instead of at interpreter exit.

    Streaming registers an ``atexit`` clean-up for every block it opens, which keeps them (about
    a dozen open file descriptors per dataset) until the process ends: a process that builds
    loaders again and again (evaluation, tests, notebooks) runs out of descriptors. This stops
    the dataset's reader threads (a run ends mid-epoch), unregisters the hooks of the blocks of
    its prefix and unlinks those this process created; the mappings close when the objects are
    garbage-collected.
    """
    import atexit

    from data_pipeline.streaming_compat import STREAMING_ATEXIT

    iterator = getattr(dataset, "_iterator", None)
    if iterator is not None:
        iterator.exit()
    prefix = getattr(dataset, "_shm_prefix_int", None)
    if prefix is None:
        return
    mine = f"{prefix:06d}_"
    for hook in list(STREAMING_ATEXIT.hooks):
        wrapper = getattr(hook, "__self__", None)
        blocks = [*getattr(wrapper, "created_shms", []), *getattr(wrapper, "opened_shms", [])]
        if not any(block.name.lstrip("/").startswith(mine) for block in blocks):
            continue
        atexit.unregister(hook)
        STREAMING_ATEXIT.hooks.remove(hook)
        for block in wrapper.created_shms:
            try:
                block.unlink()
            except FileNotFoundError:
                pass
        wrapper.created_shms = []
