"""Checkpoints: one format, one writer, one reader for any layout, discovery and loading.

- `format`: the layout of a ``step_N`` directory, its file names, the manifest (the complete
  marker) and its verification;
- `writer`: atomic writes of what a rank holds; one process is the one-rank case;
- `failures`: a write that failed (disk full...): clean-up and the one-line error;
- `reader`: dense weights, optimizer moments, trainer state and RNG of a checkpoint of any
  layout (one process or tp x pp x dp shards);
- `discovery`: run directory or checkpoint path -> the newest complete checkpoint;
- `load`: run directory or checkpoint -> model (eval, generate, export, `load_pretrained`).
"""

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
from trainer.checkpoint.reader import CheckpointReader
from trainer.checkpoint.writer import (
    begin_checkpoint,
    finish_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_shard,
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
    "load_model",
    "load_pretrained",
    "prune_checkpoints",
    "resolve_checkpoint",
    "rng_file",
    "save_checkpoint",
    "step_dir_name",
    "tensor_bytes",
    "verify_checkpoint",
    "what_resumes",
    "write_shard",
    "write_shared",
]
