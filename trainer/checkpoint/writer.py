"""Atomic checkpoint writes: what each rank holds, the shared files, then the complete marker.

A write has three phases: `begin_checkpoint` (a fresh ``step_N.tmp``), every rank writing what
it holds (`trainer.checkpoint.dcp_io.save_chunks`: its boxes of the weights and optimizer
moments) plus one rank the shared files (`write_shared`), and `finish_checkpoint` (manifest,
rename to ``step_N``, ``latest``). A training run drives the phases itself, with its ranks
agreeing between them; `save_checkpoint` is one process's whole checkpoint in one call (export,
import).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint.dcp_io import save_chunks
from trainer.checkpoint.discovery import list_checkpoints
from trainer.checkpoint.format import (
    CONFIG_FILE,
    LATEST,
    MANIFEST,
    STATE_FILE,
    manifest_of,
    step_dir_name,
    tmp_dir,
)
from trainer.checkpoint.rank_state import one_process_state


def begin_checkpoint(checkpoints_dir: Path, step: int) -> Path:
    """A fresh ``step_N.tmp`` directory to write a checkpoint into (a stale one is removed)."""
    tmp = tmp_dir(checkpoints_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_shared(
    directory: Path,
    trainer_state: dict[str, Any],
    config_yaml: str,
    write_extra: Callable[[Path], None] | None = None,
) -> None:
    """The files one rank writes for all: trainer state, config and the extras that travel
    with the weights (e.g. the tokenizer); the manifest lists and verifies them like the rest."""
    torch.save(trainer_state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(config_yaml)
    if write_extra is not None:
        write_extra(directory)


def finish_checkpoint(
    checkpoints_dir: Path,
    step: int,
    layout: dict[str, int] | None = None,
    known: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Hash every file of ``step_N.tmp`` into its manifest (``known``: entries already hashed
    by the writers), rename it ``step_N``, point ``latest`` at it. ``layout`` (tp, pp, dp)
    marks a checkpoint written as shards."""
    final = checkpoints_dir / step_dir_name(step)
    tmp = tmp_dir(checkpoints_dir, step)
    manifest = manifest_of(tmp, step, layout, known)
    _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. the final step after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    _write_atomic(checkpoints_dir / LATEST, final.name + "\n")
    return final


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    param_names: list[str],
    trainer_state: dict[str, Any],
    config_yaml: str,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the complete checkpoint of one process for ``step`` atomically; returns its
    directory. ``param_names``: the optimizer's parameters by index
    (`trainer.checkpoint.rank_state.optimizer_param_names`); ``write_extra(dir)`` adds files
    that travel with the weights."""
    tmp = begin_checkpoint(checkpoints_dir, step)
    save_chunks(tmp, *one_process_state(model_state, optimizer_state, param_names))
    write_shared(tmp, trainer_state, config_yaml, write_extra)
    return finish_checkpoint(checkpoints_dir, step)


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (and stale ``*.tmp``); returns the deleted."""
    removed = []
    for stale in checkpoints_dir.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old)
        removed.append(old)
    return removed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
