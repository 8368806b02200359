"""Import mosaicml-streaming on a CPU-only torch.

`import streaming` imports `streaming.vision`, which imports torchvision; the torchvision that
pip resolves is a CUDA build that cannot load beside the CPU torch. The vision dataset zoo is
unused for token data, so an empty module stands in for it before the real import.
"""

from __future__ import annotations

import atexit
import sys
import types

sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))

import streaming.base.shared.memory as _streaming_memory  # noqa: E402
from streaming import MDSWriter, Stream, StreamingDataLoader, StreamingDataset  # noqa: E402
from streaming.base.shared.memory import SharedMemory as StreamingSharedMemory  # noqa: E402
from streaming.base.storage.download import CloudDownloader  # noqa: E402
from streaming.base.world import World  # noqa: E402


class _AtexitRecorder:
    """Streaming registers an ``atexit`` clean-up for every shared-memory block it opens, which
    keeps the blocks (and their file descriptors) alive until the process exits. Recording the
    hooks lets `data_pipeline.shm.release` unregister those of a finished dataset."""

    def __init__(self) -> None:
        self.hooks: list = []

    def register(self, hook, *args, **kwargs):
        self.hooks.append(hook)
        return atexit.register(hook, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(atexit, name)


STREAMING_ATEXIT = _AtexitRecorder()
_streaming_memory.atexit = STREAMING_ATEXIT

__all__ = [
    "CloudDownloader",
    "MDSWriter",
    "Stream",
    "StreamingDataLoader",
    "StreamingDataset",
    "StreamingSharedMemory",
    "STREAMING_ATEXIT",
    "World",
]
