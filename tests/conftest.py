"""Shared fixtures: tiny configs, prepared data, and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
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
