"""`hybridtron submit` on Ray: an embedded instance, a `ray start --head` cluster through the Jobs
API (status / logs), recovery from a killed worker, and one-line errors."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.ray_local import RAY_DEFAULT_PORTS
from tests.conftest import cli_in_background, logged_losses, run_cli, tiny_run_args, wait_until
from trainer.checkpoint import verify_checkpoint

TOLERANCE = 1e-5
WORKERS = ["--num-workers", "2"]
ENV = {"OMP_NUM_THREADS": "1"}


def args_for(command: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """A tiny hybrid with a momentum residual, 2 data-parallel workers."""
    model = ("model.pattern=*M*-", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2")
    return [
        command,
        *tiny_run_args(data, run_dir, *model, "model.residual.name=heavy_ball", *extra),
    ]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    from launch.spawn import free_port

    return free_port()


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def hint(out: str, name: str) -> str:
    """The command of the end-of-run hint ``name`` ("resume", "continue longer")."""
    lines = [line for line in out.splitlines() if f"  {name}  " in line]
    assert len(lines) == 1, lines  # printed once (not by Ray's print patch and by stdout too)
    return lines[0].split(f"  {name}  ", 1)[1].split("  # ")[0].strip()


def listening_sockets(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket of ``root_pid`` and its
    descendants: the driver, GCS, raylet, agents, dashboard/monitor processes and workers."""
    tree = {root_pid: psutil.Process(root_pid)}
    tree.update({p.pid: p for p in tree[root_pid].children(recursive=True)})
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
            try:  # the executable's name first: a deep checkout path must not cut it off
                proc = tree[conn.pid]
                name = f"{proc.name()}: {' '.join(proc.cmdline())[:80]}"
            except psutil.Error:
                name = "?"
            found.append((conn.laddr.ip, conn.laddr.port, name))
    return found


def test_submit_embedded_recovers_from_a_killed_worker(tiny_data, tmp_path):
    """`hybridtron submit` without an address (embedded Ray, 2 CPU workers); SIGKILL one worker
    after the first checkpoint: the worker group restarts from the newest checkpoint, the job
    exits 0 with every step once and the losses of an uninterrupted `--nproc-per-node 2` run.
    Each line a worker prints reaches the output once; the hints repeat the submit command."""
    steps = 20
    extra = (f"trainer.max_steps={steps}", "trainer.checkpoint_every=2")
    whole = tmp_path / "whole"
    proc = run_cli(*args_for("train", tiny_data, whole, *extra, "--nproc-per-node", "2"), env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "killed"
    start = time.monotonic()
    step2 = run / "checkpoints" / "step_00000002"
    submit = args_for("submit", tiny_data, run, *extra)
    with cli_in_background(*submit, *WORKERS, env=ENV) as job:
        wait_until(job, step2.exists, 240, "checkpoint at step 2")
        workers = [
            p
            for p in psutil.Process(job.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].send_signal(signal.SIGKILL)
        out, err = job.communicate(timeout=300)
        out += err
    assert job.returncode == 0, out[-4000:]
    assert out.count(f"Done: step {steps}/{steps}") == 1, out[-4000:]
    resumed = [line for line in out.splitlines() if "[resume] from" in line]
    assert resumed, out[-4000:]  # the restarted group resumed from a checkpoint
    assert len(resumed) == len(set(resumed)), resumed  # once per restart, not twice
    rank_errors = [line for line in out.splitlines() if "hybridtron train: " in line]
    assert len(rank_errors) == len(set(rank_errors)), rank_errors  # the survivor's, once
    # the hints repeat the submit command: the recipe's overrides in order, its options
    assert hint(out, "resume") == shlex.join(["hybridtron", *submit, *WORKERS])
    # trainer.max_steps doubled in its last override (the one that counted), the others gone
    doubled = [f"trainer.max_steps={2 * steps}" if a == extra[0] else a for a in submit
               if not a.startswith("trainer.max_steps=") or a == extra[0]]  # fmt: skip
    assert hint(out, "continue longer") == shlex.join(["hybridtron", *doubled, *WORKERS])
    # Ray's bookkeeping and the surviving worker's traceback stay in Ray's logs
    for noise in (
        "Failed to query Ray Train Controller",
        "Traceback (most recent call last)",
        "Error in training function",
        "(TrainController",
        "(PlacementGroupCleaner",
    ):
        assert noise not in out, (noise, out[-4000:])  # fmt: skip
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, steps + 1))
    got, want = logged_losses(run), logged_losses(whole)
    for step in range(1, steps + 1):
        assert abs(got[step] - want[step]) / want[step] <= TOLERANCE, (step, got, want)
    print(f"embedded submit with a killed worker: {time.monotonic() - start:.1f} s")


def test_sigterm_to_submit_checkpoints_every_worker_and_exits_143(tiny_data, tmp_path):
    """Slurm's pre-emption signal reaches `hybridtron submit`, not the Ray workers: it becomes
    the PREEMPT notice, every rank checkpoints the same step, the job ends (no restart), 143."""
    run = tmp_path / "preempted"
    extra = ("trainer.max_steps=400", "trainer.checkpoint_every=0")
    with cli_in_background(*args_for("submit", tiny_data, run, *extra), *WORKERS, env=ENV) as job:
        logged = run / "metrics.jsonl"
        wait_until(job, lambda: logged.exists() and len(metrics(run)) >= 3, 240, "3 steps")
        # while the job trains: Ray, its workers and their process group listen on loopback only
        sockets = listening_sockets(job.pid)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=180)
        out += err
    assert job.returncode == 143, out[-4000:]
    assert out.count("[preempted] PREEMPT file") == 1, out[-4000:]
    assert len(sockets) >= 5, sockets  # GCS, raylet, agents, workers: found at all
    assert "gcs_server" in " ".join(name for _, _, name in sockets), sockets
    exposed = [s for s in sockets if s[0] not in LOOPBACK]
    assert not exposed, exposed
    # none of Ray's fixed ports (agent 52365, metrics 44217 / 44227): a second instance can run
    fixed = [s for s in sockets if s[1] in RAY_DEFAULT_PORTS]
    assert not fixed, fixed
    last = max(r["step"] for r in metrics(run) if "loss" in r)
    newest = sorted((run / "checkpoints").glob("step_????????"))[-1]
    assert verify_checkpoint(newest).step == last < 400
    assert not (run / "PREEMPT").exists()


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
        stop_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        subprocess.run(stop, env=stop_env, capture_output=True, timeout=120)


def test_submit_to_a_cluster_follows_the_job(ray_head, tiny_data, tmp_path):
    address, env = ray_head
    storage = tmp_path / "shared"  # launch.storage: the run directory becomes storage/<name>
    args = args_for("submit", tiny_data, tmp_path / "cluster", "trainer.max_steps=4",
                    f"launch.storage={storage}", "cluster.env.HYBRIDTRON_PROBE=42")  # fmt: skip
    run = storage / "cluster"
    proc = run_cli(*args, "--address", address, *WORKERS, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    job_id = next(line.split()[2] for line in out.splitlines() if line.startswith("submitted job"))
    assert f"[submit] entrypoint: {sys.executable} -m launch.ray_job run" in out  # a local head
    assert out.count("Done: step 4/4") == 1, out[-4000:]  # the trainer's output, followed
    # the hints repeat the submit command, --address included
    assert hint(out, "resume") == shlex.join(["hybridtron", *args, "--address", address, *WORKERS])
    seen = next(line for line in out.splitlines() if "[ray] worker environment:" in line)
    assert "HYBRIDTRON_PROBE=42" in seen and "NCCL_IB_HCA=mlx5" in seen  # cluster.env arrived
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4]
    status = run_cli("status", job_id, "--address", address, env=env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stderr
    logs = run_cli("logs", job_id, "--address", address, env=env)
    assert logs.returncode == 0 and "Done: step 4/4" in logs.stdout, logs.stderr
    stop = run_cli("stop", job_id, "--address", address, env=env)
    assert stop.returncode == 0 and "already finished" in stop.stdout, stop.stderr
    # too many workers for the cluster: one line, at once
    big_batch = "trainer.global_batch_size=128"  # valid for 64 ranks
    big = run_cli(*args, big_batch, "--address", address, "--num-workers", "64", env=env)
    assert big.returncode == 1 and "submitted job" not in big.stdout  # checked before submitting
    errors = [line for line in big.stderr.splitlines() if line.startswith("hybridtron")]
    assert len(errors) == 1 and "Traceback" not in big.stderr, big.stderr[-3000:]
    assert "needs 64 CPUs" in errors[0] and "lower --num-workers" in errors[0]


def test_a_failed_cluster_job_names_its_cause(ray_head, tiny_data, tmp_path):
    """The head runs the entrypoint with a Python that lacks the project's packages: the last
    line carries the job's exception, and submit said which Python it would use."""
    address, env = ray_head
    bare = tmp_path / "bare"  # a Python without torch, like a head whose `python` isn't the venv's
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    args = args_for("submit", tiny_data, tmp_path / "nopython", "trainer.max_steps=2")
    env = {**env, "HYBRIDTRON_JOB_PYTHON": str(bare / "bin" / "python")}
    proc = run_cli(*args, "--address", address, *WORKERS, env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[submit] entrypoint: {bare}/bin/python -m launch.ray_job run" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hybridtron submit: error: job hybridtron-nopython-"), last
    assert "FAILED: ModuleNotFoundError: No module named" in last and "exit code 1" in last, last
    assert "hybridtron logs " in last


def test_unreachable_address_is_one_line(tiny_data, tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    args = args_for("submit", tiny_data, tmp_path / "run", "trainer.max_steps=2")
    proc = run_cli(*args, "--address", address, *WORKERS, env=ENV, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hybridtron")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot reach Ray at {address}" in errors[0] and "ray start --head" in errors[0]


def test_launch_storage_sets_the_run_directory(tmp_path):
    from arch.registry import ConfigError
    from launch.config import load_config

    cfg = load_config(None, ["trainer.run_dir=runs/exp1", f"launch.storage={tmp_path}"])
    assert cfg.trainer.run_dir == str(tmp_path / "exp1") and cfg.launch.max_failures == 3
    with pytest.raises(ConfigError, match="launch.storage.*gs:// is not supported.*s3://"):
        load_config(None, ["launch.storage=gs://bucket/runs"])
