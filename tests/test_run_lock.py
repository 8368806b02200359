"""One trainer per run directory: a second one refuses, naming the live holder; the lock of a
dead trainer is taken over (the kernel drops a flock with its holder; a stale holder file on
this host with a dead pid is replaced)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import cli_in_background, message_lines, run_cli, tiny_run_args, wait_until
from trainer.run_lock import LOCK_FILE, RunDirBusy, RunDirLock

MODEL = ["model.pattern=*-*-", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2"]
HOLD = (
    "import fcntl, json, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "if len(sys.argv) > 2: os.ftruncate(fd, 0); os.pwrite(fd, sys.argv[2].encode(), 0)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def _holding(path, holder_json: str | None = None) -> subprocess.Popen:
    """Another process holding the flock on ``path`` (writing ``holder_json`` into it)."""
    args = [sys.executable, "-c", HOLD, str(path)] + ([holder_json] if holder_json else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_lock_refuses_naming_the_holder_until_released(tmp_path):
    first = RunDirLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirBusy) as err:
        RunDirLock(tmp_path).acquire()
    message = str(err.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message
    assert "started" in message and "pytest" in message  # the holder's command line
    assert "\n" not in message and "another trainer.run_dir" in message
    first.release()
    second = RunDirLock(tmp_path)
    second.acquire()  # released: free again
    second.release()


def test_a_live_holder_in_another_process_is_refused(tmp_path):
    proc = _holding(tmp_path / LOCK_FILE)  # an empty holder file: a trainer starting up
    try:
        with pytest.raises(RunDirBusy):  # the flock decides, whatever the file says
            RunDirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    RunDirLock(tmp_path).acquire()  # the kernel dropped the dead holder's flock


def test_a_stale_lock_of_a_dead_trainer_is_taken_over(tmp_path):
    """The flock is still held (e.g. by an orphaned data-loader worker of a killed trainer) but
    the trainer the file names is dead on this host: the new trainer takes over."""
    dead = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "t", "command": "old"}
    orphan = _holding(tmp_path / LOCK_FILE, json.dumps(dead))
    try:
        lock = RunDirLock(tmp_path)
        lock.acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()  # and holds it against the next one
        lock.release()
    finally:
        orphan.kill()
        orphan.wait()


def test_a_live_holder_on_another_host_is_never_taken_over(tmp_path):
    other = {"host": "elsewhere", "pid": _dead_pid(), "started": "t", "command": "remote"}
    proc = _holding(tmp_path / LOCK_FILE, json.dumps(other))
    try:
        with pytest.raises(RunDirBusy, match="on elsewhere"):
            RunDirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_cli_second_trainer_refuses_in_one_line_and_a_killed_ones_lock_is_free(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = [a for a in tiny_run_args(tiny_data, run, *MODEL) if "max_steps" not in a]
    long_run = ["train", *args, "trainer.max_steps=100000"]
    metrics = run / "metrics.jsonl"
    with cli_in_background(*long_run, env={"OMP_NUM_THREADS": "1"}) as job:
        wait_until(job, lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, 300,
                   "two logged steps")  # fmt: skip
        config_before = (run / "config.yaml").read_text()
        second = run_cli("train", *args, "trainer.max_steps=8", "trainer.seed=7")
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"pid {job.pid} on {socket.gethostname()}" in lines[0], lines[0]
        assert "is in use" in lines[0] and "trainer.max_steps=100000" in lines[0]
        assert (run / "config.yaml").read_text() == config_before  # nothing overwritten

        # The same refusal from a 2-process launch: one line (rank 0's), no launcher line.
        two = run_cli("train", *args, "trainer.max_steps=8", "--nproc-per-node", "2",
                      env={"OMP_NUM_THREADS": "1"}, timeout=600)  # fmt: skip
        assert two.returncode == 1
        lines = message_lines(two.stderr)  # without the libraries' warnings
        assert len(lines) == 1 and "is in use" in lines[0], two.stderr[-3000:]

        job.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel drops it
        job.communicate()
    after = run_cli("train", *args, "trainer.max_steps=100000", "trainer.stop_at_step=6")
    assert after.returncode == 0, after.stderr[-3000:]
    assert "[resume]" in after.stdout + after.stderr
