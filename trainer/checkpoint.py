"""Atomic checkpoints, their verification, discovery and retention.

Layout of ``run_dir/checkpoints``::

    step_00000100/            model.safetensors, optimizer.pt, state.pt, config.yaml, manifest.json
    step_00000200/
    latest                    "step_00000200", replaced atomically after the directory is complete

A checkpoint is written into ``step_N.tmp`` and renamed, so a directory named ``step_N`` is only
ever complete; ``manifest.json`` is written last inside it and lists every file's size and
xxh64, so truncation or bit rot is caught on load instead of half-loading a model.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from arch.registry import UserError
from data_pipeline.integrity import file_xxh64

FORMAT = "hybridtron-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or written for another model."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class Checkpoint:
    """A verified checkpoint directory and what it holds."""

    path: Path
    step: int
    config: dict  # the resolved run config it was written with
    layout: dict[str, int] | None = None  # tp, pp, dp of a sharded (multi-process) checkpoint

    @property
    def sharded(self) -> bool:
        return self.layout is not None

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole model as one process holds it, whatever layout wrote the checkpoint."""
        if self.sharded:
            from trainer.parallel.checkpoint import ShardedCheckpoint

            return ShardedCheckpoint(self).dense_model_state()
        return load_file(self.path / MODEL_FILE)

    def optimizer_state(self) -> dict:
        return torch.load(self.path / OPTIMIZER_FILE, weights_only=False)

    def trainer_state(self) -> dict:
        return torch.load(self.path / STATE_FILE, weights_only=False)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict[str, Any],
    config_yaml: str,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` atomically; returns its directory.

    ``write_extra(dir)`` adds files that travel with the weights (e.g. the tokenizer); they are
    listed in the manifest and verified like the rest.
    """
    tmp = begin_checkpoint(checkpoints_dir, step)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / MODEL_FILE)
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    if write_extra is not None:
        write_extra(tmp)
    return finish_checkpoint(checkpoints_dir, step)


def begin_checkpoint(checkpoints_dir: Path, step: int) -> Path:
    """A fresh ``step_N.tmp`` directory to write a checkpoint into (a stale one is removed)."""
    tmp = checkpoints_dir / (step_dir_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(
    checkpoints_dir: Path, step: int, layout: dict[str, int] | None = None
) -> Path:
    """Hash every file of ``step_N.tmp`` into its manifest, rename it ``step_N``, point
    ``latest`` at it. ``layout`` (tp, pp, dp) marks a checkpoint written as shards."""
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / (final.name + ".tmp")
    files = {
        p.name: {"bytes": p.stat().st_size, "xxh64": file_xxh64(p)} for p in sorted(tmp.iterdir())
    }
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "files": files}
    if layout is not None:
        manifest["layout"] = layout
    _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. the final step after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    _write_atomic(checkpoints_dir / LATEST, final.name + "\n")
    return final


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
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
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
        path=path, step=int(manifest["step"]), config=config, layout=manifest.get("layout")
    )


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete-looking step directories, oldest first (``*.tmp`` leftovers are not listed)."""
    if not checkpoints_dir.is_dir():
        return []
    dirs = [p for p in checkpoints_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: p.name)


def find_latest_checkpoint(checkpoints_dir: Path) -> Checkpoint | None:
    """The newest checkpoint in ``checkpoints_dir``, verified; None when there is none.

    The newest directory wins over the ``latest`` pointer (a crash between the rename and the
    pointer update leaves a complete but unpointed directory). A corrupt newest checkpoint is an
    error, never silently skipped: the user decides whether to fall back.
    """
    dirs = list_checkpoints(checkpoints_dir)
    if not dirs:
        return None
    newest = dirs[-1]
    try:
        return verify_checkpoint(newest)
    except CheckpointError as exc:
        older = f" (the one before is {dirs[-2]})" if len(dirs) > 1 else ""
        raise CheckpointError(
            f"{exc}. To resume from an older checkpoint pass trainer.resume_from=PATH{older}; "
            f"to start over, use another trainer.run_dir"
        ) from None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (and stale ``*.tmp``); returns the deleted."""
    removed = []
    for stale in checkpoints_dir.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old)
        removed.append(old)
    return removed


# ---- a checkpoint that could not be written ----------------------------------------------
LOW_SPACE_BYTES = 1 << 20  # under this much free space, a failed write is a full disk
_FULL_MARKERS = ("No space left on device", "Disk quota exceeded", "os error 28", "[Errno 28]")


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (disk full, permissions...); its partial
    ``step_N.tmp`` is removed and the completed checkpoints are untouched."""


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, the same in a library's message
    (safetensors), or no space left where torch.save only says "file write failed"."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(marker in str(exc) for marker in _FULL_MARKERS):
        return True
    free = free_bytes(directory)
    return free is not None and free < LOW_SPACE_BYTES


def is_write_failure(exc: BaseException, directory: Path) -> bool:
    """A failed file write (as opposed to a bug or a failed collective)."""
    if isinstance(exc, OSError) or is_disk_full(exc, directory):
        return True
    # torch.save raises RuntimeError ("unexpected pos", "file write failed"), safetensors its own.
    text = str(exc)
    return any(m in text for m in ("inline_container", "PytorchStreamWriter", "I/O error"))


def free_bytes(directory: Path) -> int | None:
    for path in (directory, *directory.parents):
        if path.exists():
            return shutil.disk_usage(path).free
    return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what a checkpoint of it takes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def what_resumes(checkpoints_dir: Path) -> str:
    """What running the same command again will do, said truthfully."""
    done = [p for p in list_checkpoints(checkpoints_dir) if (p / MANIFEST).exists()]
    if done:
        return f"the same command resumes from {done[-1]}"
    return "the same command starts again from step 0 (no checkpoint was completed)"


def abandon_checkpoint(
    checkpoints_dir: Path, step: int, cause: str, disk_full: bool, needed: int | None = None
) -> CheckpointWriteError:
    """Remove the partial ``step_N.tmp`` (and a half-written ``latest``) of a failed write; the
    error to raise, saying where, how much space there is, and what resuming will do."""
    tmp = checkpoints_dir / (step_dir_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (checkpoints_dir / (LATEST + ".tmp")).unlink(missing_ok=True)
    done = [p for p in list_checkpoints(checkpoints_dir) if (p / MANIFEST).exists()]
    if needed is None and done:
        needed = dir_bytes(done[-1])  # the previous checkpoint's size: a good estimate
    after = f"then {what_resumes(checkpoints_dir)}"
    if disk_full:
        free = free_bytes(checkpoints_dir)
        space = f"{human_bytes(free)} free" if free is not None else "no space"
        need = f", about {human_bytes(needed)} needed" if needed else ""
        return CheckpointWriteError(
            f"disk full: no space left on device for checkpoint {tmp.name} in {checkpoints_dir} "
            f"({space}{need}); the partial checkpoint was removed. Free space there (or lower "
            f"trainer.keep_checkpoints), {after}"
        )
    first = cause.strip().splitlines()[0] if cause.strip() else "unknown error"
    return CheckpointWriteError(
        f"writing checkpoint {tmp.name} in {checkpoints_dir} failed ({first}); the partial "
        f"checkpoint was removed. Fix the cause, {after}"
    )
