"""Import mosaicml-streaming on a CPU-only torch.

`import streaming` imports `streaming.vision`, which imports torchvision; the torchvision that
pip resolves is a CUDA build that cannot load beside the CPU torch. The vision dataset zoo is
unused for token data, so an empty module stands in for it before the real import.
"""

from __future__ import annotations

import sys
import types

sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))

from streaming import MDSWriter, StreamingDataLoader, StreamingDataset  # noqa: E402
from streaming.base.util import clean_stale_shared_memory  # noqa: E402

__all__ = ["MDSWriter", "StreamingDataLoader", "StreamingDataset", "clean_stale_shared_memory"]
