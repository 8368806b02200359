"""Shared fixtures: tiny configs, prepared data, and a way to run the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from arch import ModelConfig
from data_pipeline import DataConfig, prepare_data
from trainer import OptimConfig, RunConfig, TrainerConfig

REPO = Path(__file__).resolve().parent.parent
TINY_SEQ_LEN = 32


def tiny_config(run_dir: Path, data_path: Path, **trainer_overrides) -> RunConfig:
    """A model and run small enough that a step takes milliseconds on one CPU core."""
    trainer = TrainerConfig(
        run_dir=str(run_dir),
        max_steps=8,
        seq_len=TINY_SEQ_LEN,
        micro_batch_size=2,
        global_batch_size=4,
        log_every=1,
        eval_every=0,
        eval_batches=2,
        checkpoint_every=0,
        progress=False,
    )
    for key, value in trainer_overrides.items():
        setattr(trainer, key, value)
    return RunConfig(
        model=ModelConfig(pattern="*-*-", d_model=32, n_heads=4, n_kv_heads=2),
        data=DataConfig(path=str(data_path), max_bytes=60_000, shard_size_bytes=1 << 14),
        optim=OptimConfig(warmup_steps=2),
        trainer=trainer,
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """MDS shards of 60 kB of the stdlib corpus, samples of 33 tokens (several shards)."""
    path = tmp_path_factory.mktemp("data") / "stdlib-tiny"
    prepare_data(
        DataConfig(path=str(path), max_bytes=60_000, shard_size_bytes=1 << 14),
        TINY_SEQ_LEN,
        progress=False,
    )
    return path


def tiny_run_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides of a few-step CLI run on `tiny_data`: 4 steps of 8 samples in micro-batches of
    2, a checkpoint every 2 steps, every step logged; ``extra`` (model, layout) goes last."""
    return [
        f"trainer.run_dir={run_dir}",
        f"data.path={data}",
        "data.max_bytes=60000",
        f"trainer.seq_len={TINY_SEQ_LEN}",
        "trainer.micro_batch_size=2",
        "trainer.global_batch_size=8",
        "trainer.max_steps=4",
        "optim.warmup_steps=1",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.eval_batches=2",
        "trainer.checkpoint_every=2",
        "trainer.progress=false",
        *extra,
    ]


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@contextlib.contextmanager
def cli_in_background(
    *args: str, env: dict | None = None, own_group: bool = False
) -> Iterator[subprocess.Popen]:
    """The real CLI running in the background (stdout and stderr piped), killed (with its
    process group when ``own_group``: a job that `os.killpg` can signal as a whole, as
    `scancel` does) if still running when the block ends."""
    job = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=own_group,
    )
    try:
        yield job
    finally:
        if own_group:  # workers outlive a launcher that was killed
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
        if job.poll() is None:
            job.kill()
            job.communicate()


def wait_until(job: subprocess.Popen, done: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``done()`` while ``job`` runs; fail with the job's output if it ends first, or
    when ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while not done():
        if job.poll() is not None:
            out, err = job.communicate()
            pytest.fail(f"the job ended ({job.returncode}) before {what}:\n{(out + err)[-4000:]}")
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f} s"
        time.sleep(0.1)


_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")


def message_lines(stderr: str) -> list[str]:
    """stderr without Python warnings (a library's "file:line: XWarning: ..." and the source
    line under it): the lines hybridtron itself printed."""
    lines, kept, skip_source = stderr.strip().splitlines(), [], False
    for line in lines:
        if _WARNING.match(line):
            skip_source = True
        elif skip_source and line.startswith(" "):
            skip_source = False
        else:
            skip_source = False
            kept.append(line)
    return kept


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run the real `hybridtron` console entry point in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_packed_equals_documents_alone(model, eos: int, vocab: int = 50) -> None:
    """A sample packing two documents gives, with doc_ids, the logits of each document run
    alone; without doc_ids the second document sees the first."""
    import torch

    from arch.documents import document_ids

    torch.manual_seed(1)
    first = torch.cat([torch.randint(1, vocab, (1, 6)), torch.tensor([[eos]])], dim=1)
    second = torch.randint(1, vocab, (1, 9))
    packed = torch.cat([first, second], dim=1)
    with torch.no_grad():
        together = model(packed, doc_ids=document_ids(packed, eos))
        alone = torch.cat([model(first), model(second)], dim=1)
        leaky = model(packed)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (leaky[:, first.shape[1] :] - alone[:, first.shape[1] :]).abs().max() > 1e-4
