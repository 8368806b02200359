"""`trainer.checkpoint_async`: periodic checkpoints from a host-memory snapshot, written by a
background thread while training goes on (trainer/checkpoint/background.py)."""

from __future__ import annotations

import errno
import threading
import time

import pytest
import torch

import trainer.checkpoint as checkpoint_package
from tests.conftest import tiny_config
from trainer import Trainer
from trainer.checkpoint import CheckpointReader, completed_checkpoints, verify_checkpoint
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
        ours, theirs = (
            CheckpointReader(verify_checkpoint(d / step)) for d in (async_dir, sync_dir)
        )
        a, b = ours.model_state(), theirs.model_state()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)  # the snapshot, not later
        a, b = ours.torch_optimizer_state()["state"], theirs.torch_optimizer_state()["state"]
        assert a.keys() == b.keys() and all(
            torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in b
        )
    # Resuming from a background checkpoint continues the uninterrupted run exactly.
    step_2 = str(async_dir / "step_00000002")
    resumed, _ = run(tmp_path, tiny_data, "again", checkpoint_async=True, resume_from=step_2)
    assert {s: resumed.losses[s] for s in (3, 4, 5, 6)} == {s: sync.losses[s] for s in (3, 4, 5, 6)}


def test_a_failed_background_write_stops_the_run_with_one_message(tmp_path, tiny_data, monkeypatch):
    """The writer of step 4 fails (disk full) in its thread: the run stops at the next step
    with the usual checkpoint-write error, step 2 stays complete, nothing partial remains."""
    real = checkpoint_package.save_chunks
    threads = []

    def save_chunks(directory, *args):
        threads.append(threading.current_thread().name)
        if directory.name.startswith("step_00000004"):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return real(directory, *args)

    monkeypatch.setattr(checkpoint_package, "save_chunks", save_chunks)
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
    real = checkpoint_package.save_chunks

    def slow_save_chunks(directory, *args):
        if directory.name.startswith("step_00000002"):
            (tmp_path / "pre" / PREEMPT_FILE).write_text("")  # as `hybridtron submit` asks
            time.sleep(1.0)  # still writing at the next step
        return real(directory, *args)

    monkeypatch.setattr(checkpoint_package, "save_chunks", slow_save_chunks)
    result, checkpoints = run(tmp_path, tiny_data, "pre", checkpoint_async=True)
    assert result.preempted and result.step == 3
    names = [p.name for p in completed_checkpoints(checkpoints)]
    assert names == ["step_00000002", "step_00000003"]
    for name in names:
        verify_checkpoint(checkpoints / name)
