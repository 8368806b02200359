"""A checkpoint written by a background thread while training goes on (``trainer.checkpoint_async``).

The Trainer takes the snapshot on every rank at the step (`TrainModule.prepare_save` with
``copy=True``: a host-memory copy of what the rank holds), starts one `BackgroundSave` per
rank, and trains on; the writers plan the checkpoint together over their own process group
(`torch.distributed.checkpoint`), so their collectives do not meet training's. The ranks learn that all writers are done through the flag they
already exchange every step; then they share the writers' errors and rank 0 completes the
checkpoint (manifest, rename, ``latest``) exactly as for a synchronous save. At most one save is
in flight: the next save, the run's last one and a pre-emption's wait for it first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from trainer.checkpoint.format import file_entry


class BackgroundSave:
    """Checkpoint ``step`` being written into ``tmp`` by ``write`` in a daemon thread; ``write``
    returns the names of the files it wrote, which the thread then hashes for the manifest
    (``hashes``), so completing the checkpoint hashes only what it did not write."""

    def __init__(self, step: int, tmp: Path, write: Callable[[], list[str]]) -> None:
        self.step, self.tmp = step, tmp
        self.hashes: dict[str, dict] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(write,), name=f"checkpoint-step-{step}", daemon=True
        )
        self._thread.start()

    def _run(self, write: Callable[[], list[str]]) -> None:
        try:
            for name in write():
                self.hashes[name] = file_entry(self.tmp / name)
        except BaseException as exc:  # reported on the training thread (`result`)
            self._error = exc

    def writing(self) -> bool:
        return self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> None:
        """Wait for the writer; raise what it raised."""
        self.wait()
        if self._error is not None:
            raise self._error
