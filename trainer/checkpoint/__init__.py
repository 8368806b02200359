"""Checkpoints: one format, one writer, one reader for any layout, discovery and loading.

- `format`: the layout of a ``step_N`` directory, its file names, the manifest (the complete
  marker) and its verification;
- `boxes`, `rank_state`: what a rank holds (its tensor-parallel shard, its ZeRO partition) as
  boxes of the dense tensors;
- `dcp_io`: those boxes written and read with `torch.distributed.checkpoint`;
- `writer`: the atomic phases of a write (begin, shared files, manifest and rename);
- `failures`: a write that failed (disk full...): clean-up and the one-line error;
- `reader`: dense weights, optimizer moments, trainer state and RNG of a checkpoint of any
  layout and format (`reader_dcp`: format 2; `reader_v1`: format 1, still read);
- `discovery`: run directory or checkpoint path -> the newest complete checkpoint;
- `load`: run directory or checkpoint -> model (eval, generate, export, `load_pretrained`).
"""

from trainer.checkpoint.dcp_io import Chunk, save_chunks
from trainer.checkpoint.discovery import (
    completed_checkpoints,
    find_latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    what_resumes,
)
from trainer.checkpoint.failures import (
    CheckpointWriteError,
    abandon_checkpoint,
    free_bytes,
    human_bytes,
    is_disk_full,
    is_write_failure,
    tensor_bytes,
)
from trainer.checkpoint.format import (
    CONFIG_FILE,
    MANIFEST,
    STATE_FILE,
    Checkpoint,
    CheckpointError,
    rng_file,
    step_dir_name,
    verify_checkpoint,
)
from trainer.checkpoint.load import LoadedModel, load_model, load_pretrained
from trainer.checkpoint.rank_state import one_process_state, optimizer_param_names, piece_chunks
from trainer.checkpoint.reader import CheckpointReader
from trainer.checkpoint.writer import (
    begin_checkpoint,
    finish_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_shared,
)

__all__ = [
    "CONFIG_FILE",
    "MANIFEST",
    "STATE_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointReader",
    "CheckpointWriteError",
    "Chunk",
    "LoadedModel",
    "abandon_checkpoint",
    "begin_checkpoint",
    "completed_checkpoints",
    "find_latest_checkpoint",
    "finish_checkpoint",
    "free_bytes",
    "human_bytes",
    "is_disk_full",
    "is_write_failure",
    "list_checkpoints",
    "one_process_state",
    "optimizer_param_names",
    "piece_chunks",
    "load_model",
    "load_pretrained",
    "prune_checkpoints",
    "resolve_checkpoint",
    "rng_file",
    "save_checkpoint",
    "save_chunks",
    "step_dir_name",
    "tensor_bytes",
    "verify_checkpoint",
    "what_resumes",
    "write_shared",
]
