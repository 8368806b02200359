"""Local multi-process launch (torchrun semantics): N workers of the same command on this node.

Each worker gets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT,
the variables torchrun, Slurm wrappers and Ray Train also set, so the trainer has one entry point
for all of them. When a worker fails, the others get the collective timeout to notice and exit by
themselves (each names its rank and the operation), then are stopped.

Pre-emption: a SIGTERM / SIGUSR1 may reach the launcher only (`kill PID`), the whole process
group (`scancel`, a service stop) or each worker. The launcher does not pass its first signal on
as a signal (a worker that got its own copy would take the second as "stop at once" and die
without its checkpoint): it writes a notice file that every worker checks after each step, and
the workers agree on the step to checkpoint. A second signal to the launcher is forwarded, for
workers that cannot finish their step.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer import exit_codes
from trainer.launch_dir import ENV as LAUNCH_DIR_ENV
from trainer.launch_dir import PREEMPT_NOTICE, REPORTED

GRACE_S = 15.0  # beyond the collective timeout, before surviving workers are terminated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int, launch_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if launch_dir is not None:
        env[LAUNCH_DIR_ENV] = str(launch_dir)
    # Split the cores between the workers unless the user chose (torchrun sets 1).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    return env


class SignalRelay:
    """The launcher's pre-emption signals: the first becomes the notice file, later ones are
    forwarded to the workers still running."""

    def __init__(self, notice: Path, procs: list[subprocess.Popen]) -> None:
        self.notice, self.procs, self.count = notice, procs, 0

    def __call__(self, signum: int, frame) -> None:
        self.count += 1
        if self.count == 1:
            tmp = self.notice.with_name(self.notice.name + ".tmp")
            tmp.write_text(signal.Signals(signum).name + "\n")
            os.replace(tmp, self.notice)  # a worker never reads half a notice
            return
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)


def spawn(argv: list[str], nproc: int, timeout_s: float, log=print) -> int:
    """Run ``python -m launch.cli ARGV`` as ``nproc`` ranks; the job's exit code.

    0 when every rank succeeded; 143 when every rank checkpointed after a pre-emption signal;
    75 when a rank was stopped by a signal before it checkpointed; otherwise the first failed
    rank's code (see `trainer.exit_codes`).
    """
    port = free_port()
    launch_dir = Path(tempfile.mkdtemp(prefix="hybridtron-launch-"))
    procs: list[subprocess.Popen] = []
    relay = SignalRelay(launch_dir / PREEMPT_NOTICE, procs)
    # Before the workers start: a signal during their start-up is a notice they will find.
    previous = {s: signal.signal(s, relay) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        procs += [
            subprocess.Popen(
                [sys.executable, "-m", "launch.cli", *argv],
                env=worker_env(r, nproc, port, launch_dir),
            )
            for r in range(nproc)
        ]
        _supervise(procs, timeout_s)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        return exit_codes.INTERRUPTED
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reported = (launch_dir / REPORTED).exists()
        shutil.rmtree(launch_dir, ignore_errors=True)
    code, message = job_outcome([p.returncode for p in procs], reported)
    if message:
        log(f"hybridtron: {message}", file=sys.stderr)
    return code


def _supervise(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait for every worker; once one has failed, stop the rest after the collective timeout."""
    first_failure_at = None
    while any(p.poll() is None for p in procs):
        if first_failure_at is None and any(p.poll() not in (None, 0) for p in procs):
            first_failure_at = time.monotonic()
        if (
            first_failure_at is not None
            and time.monotonic() > first_failure_at + timeout_s + GRACE_S
        ):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            time.sleep(3)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)


def job_outcome(codes: list[int], reported: bool = False) -> tuple[int, str]:
    """The job's exit code and the line to print, from the ranks' exit codes (negative: killed
    by that signal). ``reported``: a rank already printed the error that stopped the job."""
    nproc = len(codes)
    failed = [(r, c) for r, c in enumerate(codes) if c != 0]
    if not failed:
        return exit_codes.FINISHED, ""
    if all(c == exit_codes.PREEMPTED for c in codes):
        return exit_codes.PREEMPTED, ""  # every rank checkpointed the same step
    # A rank killed by a signal is the cause; ranks that exit 1 (a peer's socket closed) react
    # to it; ranks that checkpointed (143) are not. Lowest rank first.
    causes = [rc for rc in failed if rc[1] != exit_codes.PREEMPTED]
    rank, code = min(causes, key=lambda rc: (rc[1] >= 0, rc[0]))
    if code == exit_codes.STOPPED_WITHOUT_CHECKPOINT or -code in exit_codes.STOP_SIGNALS:
        how = "" if code > 0 else f" ({signal.Signals(-code).name} before it could act on it)"
        return exit_codes.STOPPED_WITHOUT_CHECKPOINT, (
            f"rank {rank} of {nproc} stopped without writing its checkpoint{how}; every rank "
            f"has stopped (exit {exit_codes.STOPPED_WITHOUT_CHECKPOINT}). Completed checkpoints "
            f"are kept: the same command resumes from the newest"
        )
    if reported:
        return (code if code > 0 else 128 - code), ""  # its one line is above
    if code < 0:
        return 128 - code, (
            f"rank {rank} of {nproc} failed (was killed by {signal.Signals(-code).name}); every "
            f"rank has stopped. Completed checkpoints are kept: run the same command again to resume"
        )
    return code, (
        f"rank {rank} of {nproc} failed (exited with {code}, see its error above); every rank has "
        f"stopped. Completed checkpoints are kept: once the cause is fixed, the same command resumes"
    )
