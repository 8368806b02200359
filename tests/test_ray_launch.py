"""`hybridtron submit` on Ray: an embedded instance, a `ray start --head` cluster through the Jobs
API (status / logs), recovery from a killed worker, and one-line errors."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, run_cli
from tests.test_distributed_train import train_args

pytest.importorskip("ray.train")

TOLERANCE = 1e-5
WORKERS = ["--num-workers", "2"]
ENV = {"OMP_NUM_THREADS": "1"}


def submit_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["submit", *train_args(data, run_dir, *extra)[1:]]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) / want[step] <= TOLERANCE, (step, got, want)


def free_port() -> int:
    from launch.spawn import free_port

    return free_port()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """The same 6 steps in one plain process (no Ray)."""
    run = tmp_path_factory.mktemp("ray") / "reference"
    proc = run_cli(*train_args(tiny_data, run, "trainer.max_steps=6"), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_submit_embedded_runs_every_step(tiny_data, reference, tmp_path):
    run = tmp_path / "embedded"
    start = time.monotonic()
    proc = run_cli(*submit_args(tiny_data, run, "trainer.max_steps=6"), *WORKERS, env=ENV)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Done: step 6/6" in out
    rows = metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert_close(losses(run), losses(reference), range(1, 7))  # Ray's dp 2 == one process
    print(f"embedded submit: {time.monotonic() - start:.1f} s")


def test_a_killed_worker_restarts_from_the_newest_checkpoint(tiny_data, tmp_path):
    """SIGKILL one of two Ray Train workers after the first checkpoint: the worker group
    restarts, resumes from the newest checkpoint, and the run ends with every step once and
    the losses of an uninterrupted run."""
    steps = 40
    extra = (f"trainer.max_steps={steps}", "trainer.checkpoint_every=2")
    whole = tmp_path / "whole"
    proc = run_cli(*train_args(tiny_data, whole, *extra), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "killed"
    job = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", *submit_args(tiny_data, run, *extra), *WORKERS],
        cwd=REPO,
        env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "step_00000002").exists():
            assert job.poll() is None, job.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        workers = [
            p
            for p in psutil.Process(job.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].send_signal(signal.SIGKILL)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-4000:]
    resumed = [line for line in out.splitlines() if "[resume] from" in line]
    assert resumed, out[-4000:]  # the restarted group resumed from a checkpoint
    rows = [r["step"] for r in metrics(run) if "loss" in r]
    assert rows == list(range(1, steps + 1))  # every step, once
    assert_close(losses(run), losses(whole), range(1, steps + 1))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with token authentication, stopped afterwards."""
    temp = tmp_path_factory.mktemp("rayhead")
    port, dash = free_port(), free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        **ENV,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_TMPDIR": str(temp),
    }
    env.pop("RAY_ADDRESS", None)
    start = [
        f"{bin_dir}/ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
        "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop = [f"{bin_dir}/ray", "stop"]
        subprocess.run(stop, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=120)


def test_submit_to_a_cluster_follows_the_job(ray_head, tiny_data, tmp_path):
    address, env = ray_head
    run = tmp_path / "cluster"
    args = submit_args(tiny_data, run, "trainer.max_steps=4")
    proc = run_cli(*args, "--address", address, *WORKERS, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    job_id = next(line.split()[2] for line in out.splitlines() if line.startswith("submitted job"))
    assert "Done: step 4/4" in out  # the trainer's output, followed to the end
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4]
    status = run_cli("status", job_id, "--address", address, env=env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stderr
    logs = run_cli("logs", job_id, "--address", address, env=env)
    assert logs.returncode == 0 and "Done: step 4/4" in logs.stdout, logs.stderr
    # too many workers for the cluster: one line, at once
    big = run_cli(*args, "--address", address, "--num-workers", "64", env=env)
    assert big.returncode == 1
    assert "needs 64 CPUs" in big.stderr and "lower --num-workers" in big.stderr


def test_unreachable_address_is_one_line(tiny_data, tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    args = submit_args(tiny_data, tmp_path / "run", "trainer.max_steps=2")
    proc = run_cli(*args, "--address", address, *WORKERS, env=ENV, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hybridtron")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot reach Ray at {address}" in errors[0] and "ray start --head" in errors[0]
