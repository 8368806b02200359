"""Local multi-process launch (torchrun semantics): N workers of the same command on this node.

Each worker gets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT,
the variables torchrun, Slurm wrappers and Ray Train also set, so the trainer has one entry point
for all of them. Signals (SIGTERM from a scheduler, Ctrl-C) are passed on to every worker, which
checkpoints and exits. When a worker fails, the others get the collective timeout to notice and
exit by themselves (each names its rank and the operation), then are stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

GRACE_S = 15.0  # beyond the collective timeout, before surviving workers are terminated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Split the cores between the workers unless the user chose (torchrun sets 1).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    return env


def spawn(argv: list[str], nproc: int, timeout_s: float, log=print) -> int:
    """Run ``python -m launch.cli ARGV`` as ``nproc`` ranks; the job's exit code.

    0 when every rank succeeded; otherwise the first failed rank's code (143 when the ranks
    stopped on a pre-emption signal after checkpointing).
    """
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "launch.cli", *argv], env=worker_env(r, nproc, port)
        )
        for r in range(nproc)
    ]

    def forward(signum: int, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    first_failure: tuple[int, int] | None = None
    deadline = None
    try:
        while any(p.poll() is None for p in procs):
            if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
                # A rank killed by a signal is the cause; ranks that exit 1 within the next
                # moment (a peer's socket closes before the peer is reaped) react to it.
                time.sleep(1.0)
                first_failure = _cause(procs)
                deadline = time.monotonic() + timeout_s + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                time.sleep(3)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    except KeyboardInterrupt:
        forward(signal.SIGINT, None)
        for p in procs:
            p.wait()
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    first_failure = first_failure or _cause(procs)  # None also when all ended between polls
    if first_failure is None:
        return 0
    rank, code = first_failure
    if all(p.returncode == 143 for p in procs):
        return 143  # every rank checkpointed after a pre-emption signal
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    log(
        f"hybridtron: rank {rank} of {nproc} failed ({how}); every rank has stopped. "
        f"Completed checkpoints are kept: run the same command again to resume",
        file=sys.stderr,
    )
    return code if code > 0 else 128 - code


def _cause(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
    """(rank, exit code) of the failure to report: a rank killed by a signal before one that
    exited with an error (that one was most likely reacting to the other), lowest rank first."""
    failed = [(r, p.poll()) for r, p in enumerate(procs) if p.poll() not in (None, 0)]
    return min(failed, key=lambda rc: (rc[1] >= 0, rc[0])) if failed else None
