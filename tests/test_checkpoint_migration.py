"""Format 1 checkpoints (dense-named safetensors shards, written before format 2) still resume
(one release of migration: read old, write new). The fixture is a real one: steps 1-2 of a
tp 2 run (2 ranks) written by hybridtron before this format, with the data it trained on and the
losses of the uninterrupted run (tests/fixtures/format1_tp2)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import REPO, logged_losses, run_cli, tiny_run_args
from trainer.checkpoint import CheckpointError, CheckpointReader, verify_checkpoint
from trainer.checkpoint.format import MANIFEST

FIXTURE = REPO / "tests" / "fixtures" / "format1_tp2"
MODEL = [
    "model.pattern=*-ME",
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.moe.num_experts=4",
    "data.max_bytes=20000",
]
TOLERANCE = 1e-5  # another layout (one process instead of tp 2): see test_distributed_train


def test_a_format_1_checkpoint_resumes_and_the_run_goes_on_in_format_2(tmp_path):
    old = verify_checkpoint(FIXTURE / "step_00000002")
    assert old.version == 1 and old.layout == {"tp": 2, "pp": 1, "dp": 1}
    assert CheckpointReader(old).optimizer_step() == 2
    data = shutil.copytree(FIXTURE / "data", tmp_path / "data")
    run = tmp_path / "resumed"
    args = tiny_run_args(data, run, *MODEL, f"trainer.resume_from={old.path}")
    proc = run_cli("train", *args, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[resume]" in proc.stdout + proc.stderr
    want = {
        row["step"]: row["loss"]
        for row in map(json.loads, (FIXTURE / "metrics.jsonl").read_text().splitlines())
        if "loss" in row
    }
    got = logged_losses(run)
    assert set(got) == {3, 4}
    for step in (3, 4):
        assert abs(got[step] - want[step]) / want[step] <= TOLERANCE, (step, got, want)
    new = verify_checkpoint(run / "checkpoints" / "step_00000004")
    assert new.version == 2 and (new.path / ".metadata").exists()


def test_a_format_this_version_does_not_read_is_refused_in_one_line(tmp_path):
    copy = shutil.copytree(FIXTURE / "step_00000002", tmp_path / "step_00000002")
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "format": "hybridtron-checkpoint/9"}))
    proc = run_cli("eval", str(copy))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "'hybridtron-checkpoint/9'" in lines[0] and "use the version that wrote it" in lines[0]
    with pytest.raises(CheckpointError, match="does not read"):
        verify_checkpoint(copy)
