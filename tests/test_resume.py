"""Checkpoints and exact resume: N steps == N/2 steps + restart + N/2 steps, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_SEQ_LEN, run_cli, tiny_config

from arch.registry import UserError
from data_pipeline import DataConfig, prepare_data
from data_pipeline.integrity import file_xxh64
from trainer import Trainer
from trainer import checkpoint as ckpt


@pytest.fixture(scope="module")
def small_epoch_data(tmp_path_factory) -> Path:
    """~150 training samples: a 4-sample global batch crosses an epoch boundary every ~37 steps."""
    path = tmp_path_factory.mktemp("data") / "small-epoch"
    prepare_data(
        DataConfig(path=str(path), max_bytes=6_000, eval_fraction=0.3, shard_size_bytes=1 << 12),
        TINY_SEQ_LEN,
        progress=False,
    )
    return path


def metric_rows(run_dir: Path) -> list[dict]:
    """Training rows of metrics.jsonl without wall-clock fields (a stopped run adds an eval)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    wall_clock = ("tokens_per_s", "perf/")  # throughput figures differ run to run
    return [
        {k: v for k, v in row.items() if not k.startswith(wall_clock)}
        for row in rows
        if "loss" in row
    ]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.CheckpointReader(ckpt.find_latest_checkpoint(run_dir / "checkpoints")).model_state()


def assert_resume_exact(
    tmp_path: Path, data: Path, steps: int = 8, data_options=None, optim_options=None, **overrides
) -> None:
    def cfg(run: str, **extra):
        c = tiny_config(tmp_path / run, data, max_steps=steps, **overrides, **extra)
        for key, value in (data_options or {}).items():
            setattr(c.data, key, value)
        for key, value in (optim_options or {}).items():
            setattr(c.optim, key, value)
        return c

    full = Trainer(cfg("full")).fit()
    first = Trainer(cfg("split", stop_at_step=steps // 2)).fit()
    second = Trainer(cfg("split")).fit()

    assert first.step == steps // 2 and second.resumed_from is not None
    assert second.resumed_from.name == ckpt.step_dir_name(steps // 2)
    assert {**first.losses, **second.losses} == full.losses  # exact float equality
    assert metric_rows(tmp_path / "split") == metric_rows(tmp_path / "full")
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_identical(tmp_path, tiny_data):
    assert_resume_exact(tmp_path, tiny_data)


def test_resume_is_bit_identical_with_accumulation_across_epochs(tmp_path, small_epoch_data):
    # 8 samples per step over ~150 samples: the run crosses two epoch boundaries, one of them
    # after the restart, and each step accumulates 4 micro-batches.
    n_train = json.loads((small_epoch_data / "hybridtron_data.json").read_text())["splits"][
        "train"
    ]["samples"]
    steps = 2 * (n_train // 8) + 4
    assert_resume_exact(tmp_path, small_epoch_data, steps, global_batch_size=8)


def test_resume_is_bit_identical_with_loader_workers_and_wsd(tmp_path, tiny_data):
    # Worker processes prefetch ahead; the loader state must count what was consumed, not read.
    assert_resume_exact(
        tmp_path, tiny_data, 6, data_options={"num_workers": 1}, optim_options={"scheduler": "wsd"}
    )


def test_resume_bit_identical_in_bf16(tmp_path, tiny_data):
    assert_resume_exact(tmp_path, tiny_data, 6, precision="bf16")


def _trained_run(tmp_path: Path, data: Path, **overrides) -> Path:
    run = tmp_path / "run"
    Trainer(tiny_config(run, data, max_steps=6, checkpoint_every=2, **overrides)).fit()
    return run


def test_retention_and_latest_pointer(tmp_path, tiny_data):
    run = _trained_run(tmp_path, tiny_data, keep_checkpoints=2)
    names = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    assert names == ["step_00000004", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    manifest = json.loads((run / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        ".metadata",  # torch.distributed.checkpoint's: one process's boxes in one data file
        "__0_0.distcp",
        "state.pt",
        "config.yaml",
    }


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_newest_checkpoint_is_refused_not_skipped(tmp_path, tiny_data, damage):
    run = _trained_run(tmp_path, tiny_data)
    model_file = run / "checkpoints" / "step_00000006" / "__0_0.distcp"  # weights and moments
    data = model_file.read_bytes()
    if damage == "truncate":
        model_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        model_file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        model_file.unlink()
    cfg = tiny_config(run, tiny_data, max_steps=10, checkpoint_every=2)
    with pytest.raises(ckpt.CheckpointError) as err:
        Trainer(cfg).fit()
    message = str(err.value)
    assert "step_00000006" in message and "trainer.resume_from" in message
    assert "step_00000004" in message  # names the fallback
    # Nothing already written is lost, and the damaged one is left for the user to inspect.
    assert (run / "checkpoints" / "step_00000004" / "manifest.json").exists()
    assert (run / "checkpoints" / "step_00000006").exists()
    # The user's way out: resume from the older one, explicitly.
    cfg.trainer.resume_from = str(run / "checkpoints" / "step_00000004")
    result = Trainer(cfg).fit()
    assert result.resumed_from.name == "step_00000004" and result.step == 10


def test_foreign_and_mismatched_checkpoints_are_refused(tmp_path, tiny_data):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weight": torch.zeros(2)}, foreign / "pytorch_model.bin")
    cfg = tiny_config(tmp_path / "new", tiny_data, resume_from=str(foreign))
    with pytest.raises(ckpt.CheckpointError, match="not a complete hybridtron checkpoint"):
        Trainer(cfg).fit()

    run = _trained_run(tmp_path, tiny_data)
    other = tiny_config(run, tiny_data, max_steps=10)
    other.model.d_model = 64
    with pytest.raises(ckpt.CheckpointError, match=r"model\.d_model: 32 in the checkpoint, 64 now"):
        Trainer(other).fit()


def test_crash_leftovers(tmp_path, tiny_data):
    run = _trained_run(tmp_path, tiny_data)
    checkpoints = run / "checkpoints"
    # A crash while writing step 8 leaves step_00000008.tmp: never treated as a checkpoint.
    shutil.copytree(checkpoints / "step_00000006", checkpoints / "step_00000008.tmp")
    (checkpoints / "step_00000008.tmp" / "manifest.json").unlink()
    # A crash between the rename and the pointer leaves a complete step dir newer than `latest`.
    (checkpoints / "latest").write_text("step_00000004\n")
    found = ckpt.find_latest_checkpoint(checkpoints)
    assert found.step == 6
    result = Trainer(tiny_config(run, tiny_data, max_steps=8, checkpoint_every=2)).fit()
    assert result.resumed_from.name == "step_00000006"
    assert not (checkpoints / "step_00000008.tmp").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_00000008"


def test_resume_disabled_with_existing_checkpoints_refuses(tmp_path, tiny_data):
    run = _trained_run(tmp_path, tiny_data)
    with pytest.raises(UserError, match="trainer.resume=false"):
        Trainer(tiny_config(run, tiny_data, max_steps=8, resume=False)).fit()


def test_cli_reports_corrupt_resume_in_one_line(tmp_path, tiny_data):
    run = _trained_run(tmp_path, tiny_data)
    (run / "checkpoints" / "step_00000006" / "state.pt").write_bytes(b"garbage")
    proc = run_cli(
        "train",
        f"trainer.run_dir={run}",
        f"data.path={tiny_data}",
        f"trainer.seq_len={TINY_SEQ_LEN}",
        "trainer.progress=false",
        "--resume-from",
        str(run / "checkpoints" / "step_00000006"),
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "state.pt" in lines[0] and "step_00000006" in lines[0]


@pytest.mark.parametrize("how", ["SIGTERM", "PREEMPT file"])
def test_sigterm_checkpoints_and_resumes_exactly(tmp_path, tiny_data, how):
    """A pre-empted job (SIGTERM, or the PREEMPT notice file that `hybridtron submit` writes for
    Ray workers, where no signal reaches the trainer) checkpoints the step it is in, exits 143,
    and resumes exactly."""
    run = tmp_path / "preempted"
    steps = 5000  # far more than it will run: the signal stops it
    args = [
        sys.executable, "-m", "launch.cli", "train", f"trainer.run_dir={run}",
        f"data.path={tiny_data}", f"trainer.seq_len={TINY_SEQ_LEN}", "trainer.progress=false",
        f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.eval_every=0",
        "trainer.checkpoint_every=0", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
        "model.pattern=*-*-", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
        "optim.warmup_steps=2", "data.max_bytes=60000",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        (run / "PREEMPT").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"[preempted] {how}" in err and "Pre-empted: step" in out
    assert not (run / "PREEMPT").exists()  # honoured, so the resumed run goes on
    stopped = ckpt.find_latest_checkpoint(run / "checkpoints")
    assert stopped is not None and 3 <= stopped.step < steps

    # Resume for a few more steps and compare with one uninterrupted run of the same length.
    until = stopped.step + 3
    resumed = run_cli(*args[3:], f"trainer.stop_at_step={until}")
    assert resumed.returncode == 0, resumed.stderr
    reference = tiny_config(tmp_path / "reference", tiny_data, max_steps=steps, stop_at_step=until)
    reference.data.max_bytes = 60_000
    Trainer(reference).fit()
    assert metric_rows(run) == metric_rows(tmp_path / "reference")


def test_restart_without_a_complete_checkpoint_says_so(tmp_path, tiny_data):
    # A run that died before its first checkpoint finished: metrics exist, only a .tmp dir.
    run = tmp_path / "run"
    Trainer(tiny_config(run, tiny_data, max_steps=2)).fit()
    checkpoints = run / "checkpoints"
    (checkpoints / "step_00000002").rename(checkpoints / "step_00000002.tmp")
    messages: list[str] = []
    result = Trainer(tiny_config(run, tiny_data, max_steps=2), log=messages.append).fit()
    assert result.resumed_from is None
    assert any("no complete checkpoint" in m and "starting from step 0" in m for m in messages)


def test_checkpoint_from_before_a_new_model_field_still_resumes(tmp_path, tiny_data):
    # A checkpoint written before a model config field existed (here: drop `mamba` and `moe`
    # from its stored config) resumes: absent fields take their default, the same model.
    run = _trained_run(tmp_path, tiny_data)
    config_file = run / "checkpoints" / "step_00000006" / "config.yaml"
    import yaml

    stored = yaml.safe_load(config_file.read_text())
    del stored["model"]["mamba"], stored["model"]["moe"]
    config_file.write_text(yaml.safe_dump(stored))
    manifest_file = run / "checkpoints" / "step_00000006" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"]["config.yaml"] = {
        "bytes": config_file.stat().st_size,
        "xxh64": file_xxh64(config_file),
    }
    manifest_file.write_text(json.dumps(manifest))
    result = Trainer(tiny_config(run, tiny_data, max_steps=8)).fit()
    assert result.resumed_from.name == "step_00000006" and result.step == 8


def test_a_second_preemption_signal_acts_at_once():
    # The first signal asks the loop to checkpoint at the end of the step; if the step cannot
    # finish (a stalled read), the second one must not be swallowed too.
    from trainer.loop import PreemptionWatcher

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        watcher = PreemptionWatcher()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.requested and watcher.signal_name == "SIGUSR1" and received == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert received == [signal.SIGUSR1]  # handed to what was installed before
        watcher.restore()
    finally:
        signal.signal(signal.SIGUSR1, previous)
