"""The layout of a checkpoint directory: file names, the manifest, and its verification.

Layout of ``run_dir/checkpoints``::

    step_00000100/            the files below, manifest.json last
    step_00000200/
    latest                    "step_00000200", replaced atomically after the directory is complete

Files of ``step_N/`` (format 2, written by `torch.distributed.checkpoint`, every layout alike)::

    __{r}_0.distcp            what rank r holds, each piece a box of a dense tensor: its weights
                              (fp32; under ZeRO its partition) and optimizer moments
                              (``model.<name>``, ``optim.state.<name>.<key>``), no gather
    .metadata                 every box's dense name, global shape and offsets (so any layout
                              reads any box), and small objects (the optimizer step; one
                              process: its optimizer's groups)
    rng-rank{r}.pt            python / numpy / torch RNG of global rank r (multi-process)
    state.pt                  step, tokens, RNG of one process, data-loader position
    config.yaml, the tokenizer

The manifest records ``"layout": {"tp", "pp", "dp"[, "ep"]}`` for a multi-process run. A
checkpoint is written into ``step_N.tmp`` and renamed, so a directory named ``step_N`` is only
ever complete; ``manifest.json`` (the complete marker) is written last inside it and lists every
file's size and xxh64, so truncation or bit rot is caught on load instead of half-loading a
model. Format 1 (dense-named safetensors per stage and tensor rank, `reader_v1`) is still read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from arch.config import ModelConfig
from arch.registry import UserError
from data_pipeline.integrity import file_xxh64
from trainer.config import RunConfig

FORMAT = "hybridtron-checkpoint/2"  # what this version writes
READABLE = {"hybridtron-checkpoint/1": 1, FORMAT: 2}  # format -> its version
MANIFEST = "manifest.json"
LATEST = "latest"
# Format 1's files (read, no longer written: `reader_v1`).
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
STEP_DIR = re.compile(r"^step_(\d{8})$")
SHARD_FILE = re.compile(r"^shard-pp(\d+)-tp(\d+)(?:-ep\d+)?\.safetensors$")
# A shard's optimizer state: one tensor per (parameter, state key) under "name:key", the step in
# the metadata; safetensors like the weights, so a reader maps one tensor at a time.
OPTIM_SHARD_FILE = re.compile(r"^optim-pp(\d+)-tp(\d+)(?:-ep\d+)?\.safetensors$")
OPTIM_STEP_KEY = "optimizer_step"


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or written for another model."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir(checkpoints_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is complete."""
    return checkpoints_dir / (step_dir_name(step) + ".tmp")


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


@dataclass
class Checkpoint:
    """A verified checkpoint directory: where it is, its step, config and layout.

    Reading its tensors is `trainer.checkpoint.reader.CheckpointReader`'s job.
    """

    path: Path
    step: int
    config: dict  # the resolved run config it was written with
    layout: dict[str, int] | None = None  # tp, pp, dp of a sharded (multi-process) checkpoint
    version: int = 2  # the format (`READABLE`)

    @property
    def sharded(self) -> bool:
        return self.layout is not None

    def run_config(self) -> RunConfig:
        """The run config it was written with, over today's defaults (fields added since then
        take their default; sections this version does not know are dropped)."""
        schema = OmegaConf.structured(RunConfig)
        stored = {k: v for k, v in self.config.items() if k in schema}
        return OmegaConf.to_object(OmegaConf.merge(schema, stored))

    def model_config(self) -> ModelConfig:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), self.config.get("model", {}))
        cfg = OmegaConf.to_object(merged)
        assert isinstance(cfg, ModelConfig)
        return cfg


def file_entry(path: Path) -> dict[str, Any]:
    """A file's manifest entry: its size and xxh64."""
    return {"bytes": path.stat().st_size, "xxh64": file_xxh64(path)}


def manifest_of(
    directory: Path,
    step: int,
    layout: dict[str, int] | None,
    known: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The manifest of a written checkpoint directory: every file's size and xxh64. ``known``:
    entries the writers already computed (a background writer hashes what it wrote), used
    where the size still matches."""
    known = known or {}
    files = {}
    for p in sorted(directory.iterdir()):
        entry = known.get(p.name)
        files[p.name] = entry if entry and entry["bytes"] == p.stat().st_size else file_entry(p)
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "files": files}
    if layout is not None:
        manifest["layout"] = layout
    return manifest


def is_complete(path: Path) -> bool:
    """Whether ``path`` carries the complete marker (its manifest); not a verification."""
    return (path / MANIFEST).exists()


def verify_checkpoint(path: str | Path) -> Checkpoint:
    """Check that ``path`` is a complete hybridtron checkpoint; raise CheckpointError if not."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        raise CheckpointError(
            f"{path} is not a complete hybridtron checkpoint ({MANIFEST} missing): it was "
            f"written by another tool or interrupted; resume from another checkpoint"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{manifest_file} is corrupt ({exc}); resume from another checkpoint"
        ) from None
    version = READABLE.get(manifest.get("format"))
    if version is None:
        raise CheckpointError(
            f"{path} has format {manifest.get('format')!r}, which this version of hybridtron "
            f"does not read (it reads {', '.join(READABLE)}); use the version that wrote it"
        )
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {path} lacks {name}; resume from another checkpoint")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} is {size} bytes, the manifest says {expected['bytes']} "
                f"(truncated?); resume from another checkpoint"
            )
        if file_xxh64(file) != expected["xxh64"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} does not match its xxh64 in the manifest (corrupt); "
                f"resume from another checkpoint"
            )
    config = OmegaConf.to_container(OmegaConf.load(path / CONFIG_FILE))
    return Checkpoint(
        path=path,
        step=int(manifest["step"]),
        config=config,
        layout=manifest.get("layout"),
        version=version,
    )
