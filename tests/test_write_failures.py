"""What a run says when it cannot go on: a full disk while checkpointing (a real full
filesystem, and ENOSPC injected into one rank of a multi-process run) and a diverged loss. One
line that says what is true of this run, a non-zero exit, no partial checkpoint, and no
suggestion to resume that cannot work."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from arch.registry import UserError
from tests.conftest import logged_losses, message_lines, run_cli, tiny_config, tiny_run_args
from trainer import Trainer
from trainer.checkpoint import verify_checkpoint

MODEL = ["model.pattern=*-*-", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2"]
PIPELINE_MODEL = [
    "model.pattern=*-|*-",
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
]
DIVERGING = ["optim.lr=1e6", "trainer.max_steps=30", "trainer.checkpoint_every=0"]


def _args(data: Path, run: Path, *extra: str, model=MODEL) -> list[str]:
    keys = {e.split("=", 1)[0] for e in extra if "=" in e}
    base = [a for a in tiny_run_args(data, run, *model) if a.split("=", 1)[0] not in keys]
    return ["train", *base, *extra]


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return lines[0]


# ---- a full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a real filesystem that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _leave_free(mount: Path, free: int) -> Path:
    filler = mount / "filler"
    size = shutil.disk_usage(mount).free - free
    filler.write_bytes(b"\0" * size)
    return filler


def test_full_disk_during_a_checkpoint_says_so_in_one_line(tiny_data, small_disk):
    """The checkpoint of step 2 fits, that of step 4 does not: one line naming the place, the
    free and needed bytes and the checkpoint the same command will resume from; no .tmp. Once
    space is freed, that resume works."""
    run = small_disk / "run"
    filler = _leave_free(small_disk, 900 * 1024)  # one checkpoint (~550 KiB) fits, not two
    args = _args(tiny_data, run, "trainer.max_steps=6", "trainer.checkpoint_every=2")
    proc = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_line(proc)
    checkpoints = run / "checkpoints"
    assert line.startswith("hybridtron train: error: disk full: no space left on device"), line
    assert f"step_00000004.tmp in {checkpoints}" in line
    assert "KiB free" in line and "KiB needed" in line, line
    assert f"resumes from {checkpoints / 'step_00000002'}" in line, line
    assert not list(checkpoints.glob("*.tmp"))
    assert verify_checkpoint(checkpoints / "step_00000002").step == 2

    filler.unlink()  # what the line asks for; then the same command resumes
    again = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[resume]" in again.stdout + again.stderr
    assert set(logged_losses(run)) == set(range(1, 7))


def test_a_disk_full_from_the_start_says_so_in_one_line(tiny_data, small_disk):
    """Not even the run's files fit (lock, config, metrics): the same kind of line."""
    run = small_disk / "run"
    _leave_free(small_disk, 0)
    proc = run_cli(*_args(tiny_data, run), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_line(proc)
    assert f"disk full: no space left on device in {run}" in line, line
    assert "starts again from step 0" in line, line


SITECUSTOMIZE = """
import errno, os, warnings
if os.environ.get("RANK") == "1":  # only rank 1's part cannot be written
    with warnings.catch_warnings():  # before the CLI's own filters: keep stderr to the point
        warnings.simplefilter("ignore")
        import trainer.checkpoint.dcp_io as dcp_io

    class FullDisk(dcp_io.FileSystemWriter):  # fails where DCP writes this rank's data file
        def write_data(self, plan, planner):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    dcp_io.FileSystemWriter = FullDisk
"""


def test_enospc_on_one_rank_stops_every_rank_with_one_line(tiny_data, tmp_path):
    """Rank 1 (the second pipeline stage) runs out of space writing its shard of step 2: every
    rank stops, rank 0 says so once, the partial checkpoint is removed, exit 1."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    run = tmp_path / "run"
    args = _args(tiny_data, run, "parallel.pipeline=2", "--nproc-per-node", "2",
                 model=PIPELINE_MODEL)  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(inject)}
    proc = run_cli(*args, env=env, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_line(proc)
    assert "rank 0" in line and "disk full: no space left on device" in line, line
    assert "step_00000002.tmp" in line and "no checkpoint was completed" in line, line
    assert "run the same command again" not in proc.stdout + proc.stderr
    assert not list((run / "checkpoints").glob("*.tmp"))


# ---- a diverged loss -----------------------------------------------------------------------
def test_diverged_fp32_run_without_checkpoint_says_only_what_is_true(tiny_data, tmp_path):
    proc = run_cli(*_args(tiny_data, tmp_path / "run", *DIVERGING))
    assert proc.returncode == 1
    line = _one_line(proc)
    assert "training diverged" in line and "Lower optim.lr (now 1e+06" in line, line
    assert "no checkpoint was written" in line, line
    assert "fp32" not in line and "resume" not in line, line  # an fp32 run, nothing to resume


def test_diverged_bf16_run_names_its_newest_checkpoint(tiny_data, tmp_path):
    cfg = tiny_config(tmp_path / "run", tiny_data, max_steps=30, checkpoint_every=1)
    cfg.trainer.precision, cfg.optim.lr = "bf16", 1e6
    with pytest.raises(UserError) as err:
        Trainer(cfg).fit()
    message = str(err.value)
    assert "or use trainer.precision=fp32 (now bf16)" in message, message
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step_????????"))[-1]
    assert f"trainer.resume_from={newest}" in message, message
    assert verify_checkpoint(newest).step < int(message.split(" at step ")[1].split(":")[0])


def test_diverged_two_process_run_says_it_once(tiny_data, tmp_path):
    args = _args(tiny_data, tmp_path / "run", *DIVERGING, "--nproc-per-node", "2")
    proc = run_cli(*args, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 1
    line = _one_line(proc)  # rank 0's; the other rank and the launcher add nothing
    assert "rank 0" in line and "training diverged" in line, line
    assert "no checkpoint was written" in line and "fp32" not in line, line
    assert "run the same command again" not in proc.stdout + proc.stderr
