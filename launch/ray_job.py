"""`hybridtron submit | status | logs | stop`: training on Ray, the driver side.

``submit`` without an address starts an embedded Ray instance on 127.0.0.1 and runs the job in
the foreground. With ``--address http://HEAD:8265`` it submits through the cluster's Jobs API:
the project code (this repository without .venv, runs, .git, caches) and the resolved config
(``hybridtron_job.yaml``) travel with the job as its working directory, and the job's entrypoint
(``python -m launch.ray_job run ...``, on the head) runs the same driver there. The driver checks
that the cluster has the resources, then runs Ray Train's TorchTrainer (see launch/ray_worker.py)
with ``FailureConfig(max_failures=launch.max_failures)``: a dead worker restarts the worker group,
which resumes from the newest complete checkpoint in trainer.run_dir. The submit command line
travels with the job too (``hybridtron_command.json``): rank 0's resume / continue-longer hints
at the end of the run repeat it.

Every failure a user can fix ends in one line (exit 1 or 2), no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from arch.registry import UsageError, UserError
from launch.ray_local import free_fixed_ports, loopback_only, loopback_torch_config
from launch.ray_output import OutputFilter, install_driver_filter, last_exception_line

REPO = Path(__file__).resolve().parent.parent
JOB_CONFIG_FILE = "hybridtron_job.yaml"
JOB_COMMAND_FILE = "hybridtron_command.json"  # the submit command line, for the hints at the end
EXCLUDED = {".venv", "venv", "runs", ".git", ".gitignore", "__pycache__", ".pytest_cache", ".ruff_cache",
            ".mypy_cache", "node_modules", "wandb"}  # fmt: skip
MAX_FILE_BYTES = 20 << 20  # larger files (data, weights) stay behind: put them on shared storage
CPUS_PER_WORKER = 1
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RAY_FIX = (
    "start one with `ray start --head` (Jobs API on the dashboard port, 8265) or pass the "
    "dashboard address of a running cluster, e.g. --address http://HEAD:8265"
)
JOB_PYTHON_ENV = "HYBRIDTRON_JOB_PYTHON"  # the Python of a cluster job's entrypoint


# --- the job: config, code, resources ---------------------------------------------------------


def _absolute(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def check_counts(num_workers: int, gpus_per_worker: int) -> None:
    if num_workers < 1:
        raise UsageError(f"--num-workers must be at least 1, got {num_workers}")
    if gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")


def prepare_config(args: list[str], num_workers: int, gpus_per_worker: int):
    """(config, config name, resolved YAML) for a job of ``num_workers`` ranks, with every
    local path made absolute (workers run in another directory, maybe on another machine)."""
    from launch.config import load_config, to_yaml

    check_counts(num_workers, gpus_per_worker)
    config, overrides = (args[0], args[1:]) if args and "=" not in args[0] else (None, args)
    cfg = load_config(config, overrides, world_size=num_workers)
    t, d = cfg.trainer, cfg.data
    t.run_dir = _absolute(t.run_dir)
    t.resume_from = _absolute(t.resume_from)
    d.path = _absolute(d.path)
    d.tokenizer_path = _absolute(d.tokenizer_path)
    for source in getattr(d, "sources", None) or []:
        source.path = _absolute(source.path)
    return cfg, config, to_yaml(cfg)


def submit_command(args: list[str], address: str | None, num_workers: int, gpus: int,
                   no_wait: bool = False) -> list[str]:  # fmt: skip
    """The `hybridtron submit` command line (after `hybridtron`) as the user gave it: recipe and
    overrides in order, then the options."""
    command = ["submit", *args, "--num-workers", str(num_workers)]
    command += ["--address", address] if address else []
    command += ["--gpus-per-worker", str(gpus)] if gpus else []
    return command + (["--no-wait"] if no_wait else [])


# Ray Train's workers replace `print` with one that logs each line (to stderr) and, as a Ray
# worker's sys.stdout is not sys.__stdout__, prints it too: each line reached the driver twice.
PRINT_PATCH_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def job_env(cfg) -> dict[str, str]:
    """Environment for every worker: cluster.env (NCCL / InfiniBand) plus unbuffered output,
    each printed line once."""
    return {
        **{k: str(v) for k, v in cfg.cluster.env.items()},
        "PYTHONUNBUFFERED": "1",
        **PRINT_PATCH_ENV,
    }


def stage_code(config_yaml: str, command: list[str] | None = None) -> Path:
    """A copy of the project (small files only) plus the resolved config and the submit command
    line: the job's payload."""
    stage = Path(tempfile.mkdtemp(prefix="hybridtron-job-"))

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set()
        for name in names:
            path = Path(directory) / name
            if name in EXCLUDED or name.endswith(".egg-info"):
                skipped.add(name)
            elif path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
                skipped.add(name)
        return skipped

    shutil.copytree(REPO, stage / "code", ignore=ignore, symlinks=False)
    (stage / "code" / JOB_CONFIG_FILE).write_text(config_yaml)
    if command is not None:
        (stage / "code" / JOB_COMMAND_FILE).write_text(json.dumps(command))
    return stage / "code"


def check_resources(num_workers: int, gpus_per_worker: int, total: dict | None = None) -> None:
    """Fail at once (not wait forever for a placement) when the cluster is too small;
    ``total``: the cluster's resources (default: those of the Ray instance this process is on)."""
    if total is None:
        import ray

        total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    need_cpus, need_gpus = num_workers * CPUS_PER_WORKER, num_workers * gpus_per_worker
    if cpus < need_cpus or gpus < need_gpus:
        raise UserError(
            f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs, but --num-workers "
            f"{num_workers} --gpus-per-worker {gpus_per_worker} needs {need_cpus} CPUs and "
            f"{need_gpus} GPUs; lower --num-workers or add nodes to the cluster"
        )


def resources_at(address: str) -> dict | None:
    """The summed resources of the cluster's alive nodes (state API), None if it won't say."""
    try:
        from ray.util.state import list_nodes

        nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
    except Exception:
        return None
    total: dict[str, float] = {}
    for node in nodes:
        if node.state == "ALIVE":
            for key, value in (node.resources_total or {}).items():
                total[key] = total.get(key, 0) + value
    return total or None


def _last_line(exc: BaseException) -> str:
    """The exception's own `SomeError: message` line, else its last line."""
    text = str(getattr(exc, "cause", None) or exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return last_exception_line(text) or (lines[-1] if lines else type(exc).__name__)


def _worker_error(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank, error = sorted(failures.items())[0]
        return f"worker rank {rank}: {_last_line(error)}"
    inner = getattr(exc, "controller_failure", None)
    return _last_line(inner if inner is not None else exc)


def drive(config_yaml: str, config_name: str | None, num_workers: int, gpus: int,
          loopback: bool = False, command: list[str] | None = None) -> int:  # fmt: skip
    """Run the TorchTrainer on the Ray instance this process is connected to; ``loopback``: the
    embedded instance, whose process group listens on 127.0.0.1 too; ``command``: the submit
    command line, which rank 0's hints at the end repeat (None: a submit of the run directory's
    config.yaml)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from launch.ray_worker import load_config_text, train_loop

    cfg = load_config_text(config_yaml, num_workers)
    check_resources(num_workers, gpus)
    install_driver_filter()  # Ray's bookkeeping and peers' tracebacks stay in the Ray logs
    run_dir = Path(cfg.trainer.run_dir)
    resources = {"CPU": CPUS_PER_WORKER, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config_yaml": config_yaml,
            "config_name": config_name,
            "command": command,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        torch_config=(loopback_torch_config if loopback else TorchConfig)(
            backend="nccl" if gpus else "gloo", timeout_s=int(cfg.parallel.timeout_s)
        ),
        run_config=ray.train.RunConfig(
            name="ray",
            storage_path=str(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.launch.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # no INFO chatter
        ),
    )
    print(
        f"[ray] {num_workers} worker(s) x {gpus} GPU(s), max_failures "
        f"{cfg.launch.max_failures}, run directory {run_dir}",
        flush=True,
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise UserError(
            f"the job failed ({_worker_error(exc)}); worker logs are above, the run directory "
            f"is {run_dir} (completed checkpoints are kept: submit again to resume)"
        ) from None
    return 0


# --- submit -----------------------------------------------------------------------------------


class PreemptionRelay:
    """SIGTERM / SIGUSR1 to the submitting process (Slurm's pre-emption signal reaches the batch
    script's foreground command) become the trainer's PREEMPT notice in the run directory: every
    rank checkpoints at the end of its step and the job ends; then submit exits 143."""

    def __init__(self, run_dir: str) -> None:
        from trainer.loop import PREEMPT_FILE

        self.notice = Path(run_dir) / PREEMPT_FILE
        self.signalled = False

    def install(self) -> PreemptionRelay:
        """After `ray.init` (which installs Ray's own handler, one that just exits)."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signalled = True
        try:
            self.notice.parent.mkdir(parents=True, exist_ok=True)
            self.notice.touch()
            print(f"\n[preempt] {signal.Signals(signum).name}: asked the run to checkpoint and "
                  f"stop ({self.notice})", file=sys.stderr, flush=True)  # fmt: skip
        except OSError as exc:
            print(f"\n[preempt] cannot write {self.notice} ({exc}); the job goes on",
                  file=sys.stderr, flush=True)  # fmt: skip

    def exit_code(self, code: int) -> int:
        return 143 if self.signalled and code == 0 else code


def run_embedded(config_yaml: str, config_name: str | None, env: dict, num_workers: int,
                 gpus: int, relay: PreemptionRelay | None = None,
                 command: list[str] | None = None) -> int:  # fmt: skip
    """An embedded Ray instance on 127.0.0.1 for this job, in the foreground, on free ports
    (several run side by side)."""
    import logging

    loopback_only()
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # "Token authentication is enabled": true, and nothing to act on for a private instance
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    with free_fixed_ports():
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            object_store_memory=512 << 20,
            logging_level="WARNING",
            runtime_env={"env_vars": env},
        )
    if relay is not None:
        relay.install()
    try:
        return drive(config_yaml, config_name, num_workers, gpus, loopback=True, command=command)
    finally:
        ray.shutdown()


def _auth_env() -> None:
    """Ray 2.60 clusters use token authentication: turn it on for the client where a token is
    at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").exists()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    return address


def _client_error(exc: BaseException, address: str) -> UserError:
    name = type(exc).__name__
    if "Authentication" in name:
        return UserError(
            f"Ray at {address} refused the request ({_last_line(exc)}); set RAY_AUTH_MODE=token "
            "and the cluster's token in RAY_AUTH_TOKEN (or ~/.ray/auth_token)"
        )
    return UserError(f"cannot reach Ray at {address} ({_last_line(exc)}); {RAY_FIX}")


def connect(address: str | None):
    """A JobSubmissionClient for ``address``, or one line saying why not."""
    import logging

    _auth_env()
    address = _address(address)
    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.WARNING)  # not "uploading package ..."

    try:
        return JobSubmissionClient(address), address
    except Exception as exc:  # ConnectionError, AuthenticationError, a non-Ray server, ...
        raise _client_error(exc, address) from None


def submit(args: list[str], address: str | None, num_workers: int, gpus: int,
           no_wait: bool = False) -> int:  # fmt: skip
    """`hybridtron submit`: the job's exit code (0 when it succeeded, 143 when pre-empted)."""
    check_counts(num_workers, gpus)
    command = submit_command(args, address, num_workers, gpus, no_wait)
    if address is None:
        if no_wait:
            raise UsageError("--no-wait needs --address (an embedded Ray runs in the foreground)")
        cfg, config_name, config_yaml = prepare_config(args, num_workers, gpus)
        relay = PreemptionRelay(cfg.trainer.run_dir)
        env = job_env(cfg)
        code = run_embedded(config_yaml, config_name, env, num_workers, gpus, relay, command)
        return relay.exit_code(code)
    client, address = connect(address)  # first: an unreachable cluster fails at once
    cfg, config_name, config_yaml = prepare_config(args, num_workers, gpus)
    total = resources_at(address)
    if total is not None:  # else the job's entrypoint checks
        check_resources(num_workers, gpus, total)
    env = job_env(cfg)
    code = stage_code(config_yaml, command)
    name = Path(cfg.trainer.run_dir).name
    job_id = f"hybridtron-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    python = job_python(address)
    entrypoint = (
        f"{shlex.quote(python)} -m launch.ray_job run {JOB_CONFIG_FILE} --num-workers "
        f"{num_workers} --gpus-per-worker {gpus} --command-file {JOB_COMMAND_FILE}"
        + (f" --config-name {shlex.quote(config_name)}" if config_name else "")
    )
    where = "" if python != "python" else f"  (the head's PATH decides; {JOB_PYTHON_ENV} picks one)"
    print(f"[submit] entrypoint: {entrypoint}{where}", flush=True)
    try:
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env={"working_dir": str(code), "env_vars": env},
            metadata={"run_dir": str(cfg.trainer.run_dir)},
        )
    except Exception as exc:
        raise _client_error(exc, address) from None
    finally:
        shutil.rmtree(code.parent, ignore_errors=True)
    print(f"submitted job {job_id} to {address}", flush=True)
    print(f"  run directory  {cfg.trainer.run_dir}")
    print(f"  follow         hybridtron logs {job_id} --address {address} --follow")
    print(f"  status / stop  hybridtron status|stop {job_id} --address {address}", flush=True)
    if no_wait:
        return 0
    relay = PreemptionRelay(cfg.trainer.run_dir).install()  # the run dir is on shared storage
    return relay.exit_code(follow(client, job_id, address))


def job_python(address: str) -> str:
    """The Python of the job's entrypoint on the head: $HYBRIDTRON_JOB_PYTHON; else this one
    when the head is this machine (it has this environment); else `python` on the head's PATH."""
    chosen = os.environ.get(JOB_PYTHON_ENV, "").strip()
    if chosen:
        return chosen
    return sys.executable if _is_this_machine(urlparse(address).hostname or "") else "python"


def _is_this_machine(host: str) -> bool:
    import ipaddress

    import psutil

    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return any(ipaddress.ip_address(ip).is_loopback or ip in mine for ip in ips)


def follow(client, job_id: str, address: str) -> int:
    """Stream the job's logs (less Ray's noise) until it ends; its exit code."""

    async def tail() -> None:
        shown, partial = OutputFilter(), ""
        async for chunk in client.tail_job_logs(job_id):
            *lines, partial = (partial + chunk).split("\n")
            for line in shown.lines(lines):
                print(line, flush=True)
        for line in shown.lines([partial] if partial else []):
            print(line, flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job_id} keeps running: "
            f"hybridtron stop {job_id} --address {address}",
            file=sys.stderr,
        )
        return 130
    except Exception:
        pass  # the log stream broke: the status below says how the job ended
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    info = client.get_job_info(job_id)
    raise UserError(
        f"job {job_id} {status}: {_failure_line(client, job_id, info)}; full logs: "
        f"hybridtron logs {job_id} --address {address}"
    )


def _failure_line(client, job_id: str, info) -> str:
    """The job's own error line (ours start with 'hybridtron'), else the last exception line of
    its logs (a traceback's cause, e.g. an entrypoint Python without torch), with Ray's reason."""
    try:
        logs = client.get_job_logs(job_id)
    except Exception:
        logs = ""
    for line in reversed(logs.splitlines()):
        if line.lstrip().startswith("hybridtron") and "error: " in line:
            return line.split("error: ", 1)[1].strip()
    message = (getattr(info, "message", "") or "").strip().splitlines()
    reason = message[0].split(", last available logs")[0].rstrip(":") if message else ""
    cause = last_exception_line(logs)
    if cause:
        return f"{cause} ({reason})" if reason else cause
    return reason or "no message"


# --- status / logs / stop ---------------------------------------------------------------------


def job_command(command: str, job_id: str, address: str | None, follow_logs: bool = False) -> int:
    client, address = connect(address)
    try:
        if command == "status":
            info = client.get_job_info(job_id)
            status = str(info.status.value)
            line = f"{job_id}: {status}"
            if info.message:
                line += f" ({info.message.strip().splitlines()[0]})"
            print(line)
            return 0
        if command == "logs":
            if follow_logs:
                return follow(client, job_id, address)
            print(client.get_job_logs(job_id), end="")
            return 0
        stopped = client.stop_job(job_id)
        print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    except UserError:
        raise
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise UserError(f"no job {job_id!r} at {address}; `ray job list` lists them") from None
        raise _client_error(exc, address) from None
    except Exception as exc:
        raise _client_error(exc, address) from None


# --- the job's entrypoint on the cluster ------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.ray_job run CONFIG_YAML --num-workers N --gpus-per-worker G
    [--command-file JSON] [--config-name NAME]``."""
    import ray

    parser = argparse.ArgumentParser(prog="python -m launch.ray_job")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("config_yaml")
    parser.add_argument("--num-workers", type=int, required=True)
    parser.add_argument("--gpus-per-worker", type=int, default=0)
    parser.add_argument("--config-name")
    parser.add_argument("--command-file", help="the submit command line, a JSON list")
    args = parser.parse_args(argv)
    try:
        ray.init(logging_level="WARNING")  # the cluster this job runs on (RAY_ADDRESS)
        text = Path(args.config_yaml).read_text()
        command = json.loads(Path(args.command_file).read_text()) if args.command_file else None
        return drive(text, args.config_name, args.num_workers, args.gpus_per_worker,
                     command=command)  # fmt: skip
    except UserError as exc:
        print(f"hybridtron submit: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
