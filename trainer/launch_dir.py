"""Files by which the `hybridtron train --nproc-per-node` launcher and its ranks talk.

The launcher makes a fresh directory per launch and names it in ``HYBRIDTRON_LAUNCH_DIR``:

    preempt    written by the launcher on its first SIGTERM / SIGUSR1 (holds the signal's name);
               every rank checks it after each step, as it checks the run's PREEMPT file
    reported   written by the rank that printed the error which stopped the job, so the
               launcher adds no second, vaguer line
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "HYBRIDTRON_LAUNCH_DIR"
PREEMPT_NOTICE = "preempt"
REPORTED = "reported"


def launch_file(name: str) -> Path | None:
    """``name`` in this rank's launch directory; None outside a local multi-process launch."""
    directory = os.environ.get(ENV)
    return Path(directory) / name if directory else None


def note_reported(message: str) -> None:
    path = launch_file(REPORTED)
    if path is not None:
        try:
            path.write_text(message + "\n")
        except OSError:
            pass  # at worst the launcher adds its own line
