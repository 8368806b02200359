"""One trainer per run directory: an exclusive lock on ``run_dir/run.lock``.

The lock is an ``fcntl.flock`` on the file (the kernel drops it when the holder dies, however it
dies) and the file holds a small JSON naming the holder (host, pid, start time, command), so a
second trainer can say who is using the directory. A lock that is still held although its holder
is dead (a forked data-loader worker of a killed trainer keeps the file open) is taken over when
the holder ran on this host and its pid is gone. In a multi-process run only global rank 0 takes
it, so a restarted job (Ray restarting its worker group, a requeued Slurm job) gets the lock of
its dead predecessor like any new run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from arch.registry import UserError

LOCK_FILE = "run.lock"
WAIT_S = 10.0  # how long a trainer waits for a holder that is exiting before it refuses
# Filesystems without working flock (some FUSE or Lustre mounts without -o flock).
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirBusy(UserError):
    """Another live trainer holds the run directory."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (jiffies since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after "comm"


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


def holder_info() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start(pid),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": _command(),
    }


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("launch/cli.py", "/hybridtron")):
        argv[0] = "hybridtron"  # `python -m launch.cli` shows as its path
    return shlex.join(argv)


class RunDirLock:
    """Hold ``run_dir/run.lock`` from `acquire` until `release` (or the process ends)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait_s`` for a live holder to let go (a restarted
        job's predecessor may still be exiting); RunDirBusy if it does not."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._try_acquire()
            except RunDirBusy:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.5)

    def _try_acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover replaces the file; a racing trainer may do the same
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if self._lock(fd):
                if os.fstat(fd).st_ino != _inode(self.path):  # replaced while we waited
                    os.close(fd)
                    continue
                self._fd = fd
                self._write_holder()
                return
            holder = self._holder()
            os.close(fd)
            if not self._stale(holder):
                raise RunDirBusy(self._busy_message(holder))
            self.path.unlink(missing_ok=True)  # the holder is dead: take the lock over
        raise RunDirBusy(self._busy_message(self._holder()))

    def _lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            if exc.errno in _NO_FLOCK:
                # No kernel lock here: the holder file alone decides (same host: is it alive?).
                holder = self._holder(fd)
                return not holder or self._stale(holder)
            raise
        return True

    def _holder(self, fd: int | None = None) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode() if fd is not None else self.path.read_text()
            holder = json.loads(text)
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if not holder:
            return False  # being written by a trainer starting right now: treat it as live
        if holder.get("host") != socket.gethostname():
            return False  # cannot tell whether a process on another machine is alive
        return not _alive(int(holder.get("pid", 0)), holder.get("pid_start"))

    def _write_holder(self) -> None:
        assert self._fd is not None
        data = (json.dumps(holder_info()) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _busy_message(self, holder: dict) -> str:
        who = (
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')}"
            if holder
            else "another process"
        )
        return (
            f"trainer.run_dir {self.path.parent} is in use by a running trainer ({who}); wait for "
            f"it or stop it, or use another trainer.run_dir"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no holder; the file stays (unlinking races a new holder)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
