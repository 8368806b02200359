"""`trainer.checkpoint_async`: periodic checkpoints from a host-memory snapshot, written by a
background thread while training goes on (trainer/checkpoint/background.py)."""

from __future__ import annotations

import errno
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import trainer.checkpoint.writer as writer
from tests.conftest import tiny_config
from trainer import Trainer
from trainer.checkpoint import completed_checkpoints, verify_checkpoint
from trainer.checkpoint.failures import CheckpointWriteError
from trainer.loop import PREEMPT_FILE


def run(tmp_path, tiny_data, name: str, **overrides):
    cfg = tiny_config(tmp_path / name, tiny_data, max_steps=6, checkpoint_every=2, **overrides)
    return Trainer(cfg).fit(), tmp_path / name / "checkpoints"


def test_async_checkpoints_hold_exactly_what_synchronous_ones_hold(tmp_path, tiny_data):
    sync, sync_dir = run(tmp_path, tiny_data, "sync")
    background, async_dir = run(tmp_path, tiny_data, "async", checkpoint_async=True)
    assert background.losses == sync.losses  # training did not wait on (or see) the writer
    # Periodic saves at 2 and 4 in the background, the last one synchronously; keep 3.
    assert [p.name for p in completed_checkpoints(async_dir)] == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]
    for step in ("step_00000002", "step_00000004"):
        verify_checkpoint(async_dir / step)  # manifest, hashes, complete marker
        ours = load_file(async_dir / step / "model.safetensors")
        theirs = load_file(sync_dir / step / "model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the snapshot, not later
        ours = torch.load(async_dir / step / "optimizer.pt", weights_only=False)["state"]
        theirs = torch.load(sync_dir / step / "optimizer.pt", weights_only=False)["state"]
        assert all(torch.equal(ours[i]["exp_avg"], theirs[i]["exp_avg"]) for i in theirs)
    # Resuming from a background checkpoint continues the uninterrupted run exactly.
    step_2 = str(async_dir / "step_00000002")
    resumed, _ = run(tmp_path, tiny_data, "again", checkpoint_async=True, resume_from=step_2)
    assert {s: resumed.losses[s] for s in (3, 4, 5, 6)} == {s: sync.losses[s] for s in (3, 4, 5, 6)}


def test_a_failed_background_write_stops_the_run_with_one_message(tmp_path, tiny_data, monkeypatch):
    """The writer of step 4 fails (disk full) in its thread: the run stops at the next step
    with the usual checkpoint-write error, step 2 stays complete, nothing partial remains."""
    real = writer.write_rank
    threads = []

    def write_rank(directory, *args):
        threads.append(threading.current_thread().name)
        if directory.name.startswith("step_00000004"):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return real(directory, *args)

    monkeypatch.setattr(writer, "write_rank", write_rank)
    with pytest.raises(CheckpointWriteError) as info:
        run(tmp_path, tiny_data, "full", checkpoint_async=True)
    message = str(info.value)
    assert message.startswith("disk full: no space left on device for checkpoint step_00000004")
    assert "partial checkpoint was removed" in message and "\n" not in message
    checkpoints = tmp_path / "full" / "checkpoints"
    assert [p.name for p in completed_checkpoints(checkpoints)] == ["step_00000002"]
    assert not any(p.name.endswith(".tmp") for p in checkpoints.iterdir())
    assert threads == ["checkpoint-step-2", "checkpoint-step-4"]  # written off the main thread


def test_preemption_waits_for_the_checkpoint_in_flight(tmp_path, tiny_data, monkeypatch):
    """A pre-emption request arrives while step 2's checkpoint is being written: the run
    completes that checkpoint, then writes the step it stops at."""
    real = writer.write_rank

    def slow_write_rank(directory, *args):
        if directory.name.startswith("step_00000002"):
            (tmp_path / "pre" / PREEMPT_FILE).write_text("")  # as `hybridtron submit` asks
            time.sleep(1.0)  # still writing at the next step
        return real(directory, *args)

    monkeypatch.setattr(writer, "write_rank", slow_write_rank)
    result, checkpoints = run(tmp_path, tiny_data, "pre", checkpoint_async=True)
    assert result.preempted and result.step == 3
    names = [p.name for p in completed_checkpoints(checkpoints)]
    assert names == ["step_00000002", "step_00000003"]
    for name in names:
        verify_checkpoint(checkpoints / name)
