"""Finding checkpoints: a run directory, its checkpoints/ or one step_N -> the newest complete one."""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint.format import (
    STEP_DIR,
    Checkpoint,
    CheckpointError,
    is_complete,
    verify_checkpoint,
)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete-looking step directories, oldest first (``*.tmp`` leftovers are not listed)."""
    if not checkpoints_dir.is_dir():
        return []
    dirs = [p for p in checkpoints_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: p.name)


def completed_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The step directories that carry their complete marker, oldest first (not verified)."""
    return [p for p in list_checkpoints(checkpoints_dir) if is_complete(p)]


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


def is_checkpoint_source(path: Path) -> bool:
    """Whether ``path`` looks like a checkpoint, a run's checkpoints/ or a run directory."""
    return is_complete(path) or any(list_checkpoints(d) for d in (path, path / "checkpoints"))


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint directory, a run's checkpoints/ directory, or a run directory (-> its
    newest checkpoint), verified, or an ``s3://`` URL of one or of a store prefix (downloaded
    into the cache: `remote.fetch_checkpoint`); a CheckpointError (one line) when there is none."""
    if str(path).startswith("s3://"):
        from trainer.checkpoint.remote import fetch_checkpoint

        return fetch_checkpoint(str(path))
    p = Path(path)
    if is_complete(p) or not p.exists():
        return verify_checkpoint(p)
    for checkpoints_dir in (p, p / "checkpoints"):
        if list_checkpoints(checkpoints_dir):
            found = find_latest_checkpoint(checkpoints_dir)
            assert found is not None
            return found
    raise CheckpointError(
        f"{path} holds no hybridtron checkpoint; pass a run directory or checkpoints/step_N"
    )


def what_resumes(checkpoints_dir: Path) -> str:
    """What running the same command again will do, said truthfully."""
    done = completed_checkpoints(checkpoints_dir)
    if done:
        return f"the same command resumes from {done[-1]}"
    return "the same command starts again from step 0 (no checkpoint was completed)"
