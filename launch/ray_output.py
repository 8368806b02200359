"""What of a Ray job's output reaches the user, and the line that says why a job failed.

Ray forwards every worker's and actor's stdout/stderr to the driver. Most of it is Ray's own
bookkeeping: the placement-group cleaner's "Failed to query ..." every few seconds, the train
controller's restart reports (each repeating every worker's traceback), and the tracebacks of
workers that died because a peer did. :class:`OutputFilter` drops that and keeps the trainer's own
lines (progress, ``[resume]``, ``Done``) and each exception's last line; the full logs stay in the
Ray session directory (``/tmp/ray/session_latest/logs``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# `(RayTrainWorker pid=123, ip=...)` with Ray's colour codes around it, then the message.
PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?P<source>[^()]*)\)(?:\x1b\[[0-9;]*m)? ?(?P<msg>.*)$")
# `ModuleNotFoundError: No module named 'torch'`, `ray.exceptions.ActorDiedError: ...`
EXCEPTION_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Exit|Interrupt)(?::\s.*)?$"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray actors whose output is bookkeeping only; kept: the lines that start with these markers.
QUIET_SOURCES = {
    "PlacementGroupCleaner": (),
    "TrainController": ("[FailurePolicy]", "Error count:"),
}
NOISE = (
    "Failed to query Ray Train Controller actor state",  # the cleaner, without a state API
    "Error in training function:",  # Ray Train's header above a worker's traceback
    "The above exception was the direct cause of the following exception:",
    "During handling of the above exception, another exception occurred:",
    "Setting up process group for:",
)


class OutputFilter:
    """Stateful, per source: a traceback's frames are dropped, its exception line kept."""

    def __init__(self) -> None:
        self._in_traceback: set[str] = set()

    def keep(self, source: str, message: str) -> bool:
        """Whether the line ``message`` from ``source`` (e.g. 'RayTrainWorker pid=7') is shown."""
        text = ANSI.sub("", message)
        actor = source.split(" ", 1)[0]
        if actor in QUIET_SOURCES:
            return text.strip().startswith(QUIET_SOURCES[actor]) if QUIET_SOURCES[actor] else False
        if text.startswith("Traceback (most recent call last):"):
            self._in_traceback.add(source)
            return False
        if source in self._in_traceback:
            if not text.strip() or text[:1].isspace():
                return False  # a frame, its source line or its ^^^ marker
            self._in_traceback.discard(source)
            return True  # the exception line: the cause
        return not any(noise in text for noise in NOISE)

    def lines(self, text_lines: Iterable[str]) -> list[str]:
        """The lines of formatted output (``(source) message``) to show."""
        shown = []
        for line in text_lines:
            match = PREFIX.match(line)
            source, message = (match["source"], match["msg"]) if match else ("", line)
            if self.keep(source, message):
                shown.append(line)
        return shown


def install_driver_filter() -> bool:
    """Filter what Ray forwards from workers to this driver (after ``ray.init``; ``ray.shutdown``
    removes it). Uses Ray's internal dispatcher of worker output: with a Ray that lacks it, the
    output is left as it is (False)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    handlers = dict(getattr(dispatcher, "handlers", []))
    show = handlers.get("ray_print_logs")
    if show is None:
        return False
    noise = OutputFilter()

    def filtered(data: dict) -> None:
        name = data.get("actor_name") or data.get("task_name")
        source = f"{name} pid={data.get('pid')}" if name else str(data.get("pid"))
        lines = [line for line in data.get("lines", []) if noise.keep(source, line)]
        if lines:
            show({**data, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)
    return True


def last_exception_line(text: str) -> str | None:
    """The last ``SomeError: message`` line of a log (worker prefixes removed), if any."""
    for line in reversed(text.splitlines()):
        match = PREFIX.match(line)
        message = ANSI.sub("", match["msg"] if match else line).rstrip()
        if EXCEPTION_LINE.match(message):
            return message
    return None
