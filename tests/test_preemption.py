"""Pre-emption of a multi-process run however SIGTERM arrives (to the launcher, to the whole
process group as `scancel` or a service stop sends it, to each rank), and the exit codes that
tell a checkpointed stop (143) from one without a checkpoint of the current step (75)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from launch.spawn import job_outcome
from tests.conftest import REPO, cli_in_background, tiny_run_args, wait_until
from trainer import exit_codes
from trainer.checkpoint import rng_file, verify_checkpoint

MODEL = ["model.pattern=*-*-", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2"]
RANKS = 4


def _signal(job: subprocess.Popen, mode: str) -> None:
    if mode == "launcher":  # `kill PID`: only the launcher gets it
        job.send_signal(signal.SIGTERM)
    elif mode == "process group":  # scancel / systemctl stop: every process, at once
        os.killpg(job.pid, signal.SIGTERM)
    else:  # each rank, the launcher not at all
        for worker in psutil.Process(job.pid).children():
            worker.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("mode", ["launcher", "process group", "each rank"])
def test_sigterm_checkpoints_every_rank_at_the_same_step(tiny_data, tmp_path, mode):
    run = tmp_path / "run"
    overrides = [
        a
        for a in tiny_run_args(tiny_data, run, *MODEL)
        if not a.startswith(("trainer.max_steps", "trainer.checkpoint_every"))
    ]
    args = ["train", *overrides, "trainer.max_steps=100000", "trainer.checkpoint_every=0"]
    metrics = run / "metrics.jsonl"
    with cli_in_background(
        *args, "--nproc-per-node", str(RANKS), env={"OMP_NUM_THREADS": "1"}, own_group=True
    ) as job:
        wait_until(
            job,
            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
            300,
            "two logged steps",
        )
        _signal(job, mode)
        out, err = job.communicate(timeout=300)
    assert job.returncode == exit_codes.PREEMPTED, err[-3000:]
    checkpoints = run / "checkpoints"
    assert not list(checkpoints.glob("*.tmp")), "a partial checkpoint was left"
    (stopped,) = sorted(checkpoints.glob("step_????????"))  # checkpoint_every=0: only this one
    ckpt = verify_checkpoint(stopped)  # every file in the manifest, sizes and hashes
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert ckpt.step == last_logged  # the step the run was in, nothing lost
    assert {rng_file(r) for r in range(RANKS)} <= {p.name for p in stopped.iterdir()}
    assert f"[preempted] SIGTERM at step {ckpt.step}" in err, err[-3000:]
    assert "failed" not in err and "second SIGTERM" not in err, err[-3000:]


@pytest.mark.parametrize(
    "codes, reported, want, says",
    [
        ([143, 143, 143, 143], False, 143, ""),
        ([0, 0], False, 0, ""),
        ([143, -signal.SIGTERM, 143, 143], False, 75, "rank 1 of 4 stopped without"),
        ([143, 75, 143, 143], False, 75, "rank 1 of 4 stopped without"),
        ([1, -signal.SIGTERM], False, 75, "rank 1 of 2 stopped without"),
        ([1, -signal.SIGKILL], False, 137, "run the same command again to resume"),
        ([1, 1], True, 1, ""),  # a rank printed the one line; the launcher adds none
        ([0, 1], False, 1, "once the cause is fixed"),
    ],
)
def test_the_launcher_exit_code_says_whether_every_rank_checkpointed(codes, reported, want, says):
    code, message = job_outcome(codes, reported)
    assert code == want
    assert (says in message) if says else message == ""
    if code != 137:
        assert "run the same command again" not in message


def test_a_second_sigterm_exits_75_not_143():
    """A process that dies by its second SIGTERM would exit 143, the code of a checkpointed
    stop; it exits 75 instead, saying so."""
    script = (
        "import os, signal, time\n"
        "from trainer.loop import PreemptionWatcher\n"
        "w = PreemptionWatcher()\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "assert w.requested\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(2)\n"
        "print('survived')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == exit_codes.STOPPED_WITHOUT_CHECKPOINT, proc.stderr
    assert "survived" not in proc.stdout
    assert "a second SIGTERM: stopping at once, without a checkpoint" in proc.stderr


def test_the_launchers_notice_and_the_same_signal_count_once(tmp_path, monkeypatch):
    """The launcher writes its notice for the SIGTERM a rank may also get directly: whichever
    the rank sees first, the other is not a second request; a signal well after it is."""
    from trainer import loop

    notice = tmp_path / "preempt"
    monkeypatch.setenv("HYBRIDTRON_LAUNCH_DIR", str(tmp_path))
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        watcher = loop.PreemptionWatcher()
        notice.write_text("SIGTERM\n")
        assert watcher.check() and watcher.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGUSR1)  # the same request, delivered directly
        assert received == [] and watcher.requested
        watcher.restore()

        monkeypatch.setattr(loop, "NOTICE_WINDOW_S", 0.0)
        watcher = loop.PreemptionWatcher()
        assert watcher.check()
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)  # later: a second request, acts at once
        assert received == [signal.SIGUSR1]
        watcher.restore()
    finally:
        signal.signal(signal.SIGUSR1, previous)
