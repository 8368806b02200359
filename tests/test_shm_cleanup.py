"""A killed run's streaming shared memory is removed by the next run, live runs' is kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

from data_pipeline import DataConfig, build_train_loader, shm

HOLD_A_LOADER = """
import sys, time
from data_pipeline import DataConfig, build_train_loader
loader = build_train_loader(DataConfig(path=sys.argv[1]), 2)
next(iter(loader))
print("ready", loader.dataset._shm_prefix_int, flush=True)
time.sleep(600)
"""


def shm_files(prefix: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"{prefix:06d}_*"))


def _who_maps(prefix: int) -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"/dev/shm/{prefix:06d}_" in (entry / "maps").read_text():
                out.append((entry / "cmdline").read_text().replace("\0", " ")[:200])
        except OSError:
            continue
    return out


def start_holder(data: Path) -> tuple[subprocess.Popen, int]:
    # Its own session: killing the group also kills Python's resource tracker, which would
    # otherwise clean up after a lone SIGKILL (as on a node that loses power, nothing does).
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_LOADER, str(data)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", line
    return proc, int(line[1])


def test_killed_runs_shared_memory_is_cleaned_live_runs_is_kept(tiny_data):
    live, live_prefix = start_holder(tiny_data)
    dead, dead_prefix = start_holder(tiny_data)
    try:
        os.killpg(dead.pid, signal.SIGKILL)
        dead.wait(timeout=30)
        time.sleep(0.5)
        assert shm_files(dead_prefix), "a group kill should leave streaming's shm behind"
        removed = shm.clean_stale()
        assert any(name.startswith(f"{dead_prefix:06d}_") for name in removed), _who_maps(
            dead_prefix
        )
        assert shm_files(dead_prefix) == []
        assert shm_files(live_prefix), "a live run's shared memory must be kept"
        # A new loader over the same data works after the cleanup.
        assert next(iter(build_train_loader(DataConfig(path=str(tiny_data)), 2))).shape[0] == 2
    finally:
        os.killpg(live.pid, signal.SIGTERM)
        live.wait(timeout=30)
