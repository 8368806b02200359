"""Two data-parallel ranks with two loader workers each: disjoint shards of the epoch, and a
restart mid-epoch that neither repeats nor skips a sample (real processes under torchrun)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import REPO


def torchrun(data: Path, out: Path, mode: str, k: int = 0, nproc: int = 2) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           str(REPO / "tests" / "data_rank_worker.py"), str(data), str(out), mode, str(k)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def read(out: Path, mode: str, rank: int) -> list[tuple]:
    return [tuple(s) for s in json.loads((out / f"{mode}_rank{rank}.json").read_text())]


def test_two_ranks_partition_and_resume_exactly(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("*.mds"))
    out = tmp_path / "out"
    out.mkdir()
    torchrun(data, out, "full")
    torchrun(data, out, "first", k=7)
    torchrun(data, out, "rest")

    full = {r: read(out, "full", r) for r in (0, 1)}
    n_train = json.loads((data / "hybridtron_data.json").read_text())["splits"]["train"]["samples"]
    # The ranks split the epoch: together every sample once (up to the drop_last remainder).
    together = Counter(full[0] + full[1])
    assert sum(together.values()) >= n_train - 2 * 2 * 2
    assert len(full[0]) == len(full[1])
    everything = Counter(tuple(s) for s in _all_samples(data))
    assert not together - everything  # nothing read that is not in the split
    assert max(together.values()) <= max(everything.values())  # nothing read twice
    # Restart after 7 batches: each rank continues exactly where it stopped.
    for rank in (0, 1):
        first, rest = read(out, "first", rank), read(out, "rest", rank)
        assert len(first) == 7 * 2
        assert first + rest == full[rank]


def test_tensor_parallel_peers_get_identical_batches(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("*.mds"))
    out = tmp_path / "out"
    out.mkdir()
    torchrun(data, out, "replicated", k=10)
    rank0, rank1 = read(out, "replicated", 0), read(out, "replicated", 1)
    assert len(rank0) == 10 * 2 and rank0 == rank1


def test_pipeline_peers_read_what_their_data_parallel_rank_reads(tmp_path, tiny_data):
    """pp 2 x dp 2 (4 processes): the two stages of a data-parallel rank read identical batches,
    the same ones as that rank of a plain 2-process run, and record the same loader position."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("*.mds"))
    out = tmp_path / "out"
    out.mkdir()
    torchrun(data, out, "full")
    torchrun(data, out, "pipeline", k=5, nproc=4)
    pipe = {r: read(out, "pipeline", r) for r in range(4)}
    for dp_rank in (0, 1):
        first_stage, second_stage = pipe[dp_rank], pipe[2 + dp_rank]
        assert first_stage == second_stage == read(out, "full", dp_rank)[: 5 * 2]
    assert not set(pipe[0]) & set(pipe[1])
    states = [json.loads((out / f"state_pipeline_rank{r}.json").read_text()) for r in range(4)]
    assert all(s == states[0] for s in states)
    assert states[0]["sample_in_epoch"] == 5 * 2 * 2  # 5 batches of 2 on each of 2 dp ranks


def _all_samples(data: Path) -> list[list[int]]:
    from data_pipeline import DataConfig
    from data_pipeline.loader import _dataset

    dataset = _dataset(DataConfig(path=str(data)), "train", 1, shuffle=False)
    return [dataset[i].tolist() for i in range(dataset.num_samples)]
