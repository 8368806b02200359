"""A checkpoint that could not be written: recognising a failed write or a full disk, removing
the partial ``step_N.tmp``, and the one-line error that says what to do."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint.discovery import completed_checkpoints, what_resumes
from trainer.checkpoint.format import LATEST, CheckpointError, tmp_dir

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


def abandon_checkpoint(
    checkpoints_dir: Path, step: int, cause: str, disk_full: bool, needed: int | None = None
) -> CheckpointWriteError:
    """Remove the partial ``step_N.tmp`` (and a half-written ``latest``) of a failed write; the
    error to raise, saying where, how much space there is, and what resuming will do."""
    tmp = tmp_dir(checkpoints_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    (checkpoints_dir / (LATEST + ".tmp")).unlink(missing_ok=True)
    done = completed_checkpoints(checkpoints_dir)
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
