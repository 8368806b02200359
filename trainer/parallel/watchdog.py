"""Naming the collective a rank is in, so a hang or a dead peer becomes one clear line.

`operation(what)` marks the communication in progress. Two things turn a failure into an exit:
the process group's own timeout (``parallel.timeout_s``; gloo and NCCL raise), which the worker
reports with the operation's name, and a watchdog thread for what the group cannot see (a peer
stuck in a computation, a transfer that never times out): when one operation has lasted
``timeout_s`` plus a grace period it prints the rank and the operation and ends the process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

_current: dict[str, object] = {"what": None, "since": 0.0, "failed": None}
_prefix = ""


def set_prefix(prefix: str) -> None:
    """How messages name this process, e.g. "rank 3 (dp 1, pp 1, tp 1)"."""
    global _prefix
    _prefix = prefix


def current_operation() -> str | None:
    """The operation in progress, else the last one that raised."""
    what = _current["what"] or _current["failed"]
    return None if what is None else str(what)


@contextlib.contextmanager
def operation(what: str) -> Iterator[None]:
    previous = _current["what"], _current["since"]
    _current["what"], _current["since"] = what, time.monotonic()
    try:
        yield
    except BaseException:
        _current["failed"] = what
        raise
    finally:
        _current["what"], _current["since"] = previous


def describe_failure(exc: BaseException) -> str:
    """One line: which rank, in which operation, what went wrong."""
    what = current_operation() or "a collective"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{_prefix}: {what} failed: {first}"


class Watchdog:
    """Ends the process (exit 1) when one operation outlasts ``timeout_s`` + ``grace_s``."""

    def __init__(self, timeout_s: float, grace_s: float = 10.0) -> None:
        self.limit = timeout_s + grace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hybridtron-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            what, since = _current["what"], float(_current["since"])  # type: ignore[arg-type]
            if what is not None and time.monotonic() - since > self.limit:
                print(
                    f"hybridtron: {_prefix}: {what} did not finish in {self.limit:.0f} s "
                    f"(parallel.timeout_s); a peer is dead or hung. Exiting; completed "
                    f"checkpoints are kept",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    def stop(self) -> None:
        self._stop.set()
