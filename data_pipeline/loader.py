"""Streaming loaders over prepared MDS shards: the training stream and the held-out eval set."""

from __future__ import annotations

from pathlib import Path

import torch

from arch.registry import UserError
from data_pipeline.config import DataConfig
from data_pipeline.integrity import verify_split
from data_pipeline.prepare import read_manifest
from data_pipeline.streaming_compat import StreamingDataLoader, StreamingDataset


class TokenDataset(StreamingDataset):
    """MDS samples of seq_len + 1 tokens, returned as int64 tensors."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(super().__getitem__(index)["tokens"].astype("int64"))


def check_prepared(cfg: DataConfig, seq_len: int, vocab_size: int) -> dict:
    """The manifest of cfg.path, after checking that it fits this run."""
    manifest = read_manifest(cfg.path)
    if manifest["seq_len"] != seq_len:
        raise UserError(
            f"data at {cfg.path} was prepared for seq_len {manifest['seq_len']}, the run uses "
            f"trainer.seq_len={seq_len}; set data.path to a new directory (it is prepared on first use)"
        )
    if manifest["vocab_size"] > vocab_size:
        raise UserError(
            f"data at {cfg.path} uses tokenizer {manifest['tokenizer']!r} with "
            f"{manifest['vocab_size']} tokens but model.vocab_size={vocab_size}; raise model.vocab_size"
        )
    return manifest


def _dataset(cfg: DataConfig, split: str, batch_size: int, shuffle: bool) -> TokenDataset:
    local = Path(cfg.path) / split
    remote = f"{cfg.remote.rstrip('/')}/{split}" if cfg.remote else None
    if remote is None:
        verify_split(local)
    try:
        return TokenDataset(
            local=str(local),
            remote=remote,
            split=None,
            shuffle=shuffle,
            shuffle_seed=cfg.shuffle_seed,
            batch_size=batch_size,
            validate_hash="xxh64",
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot open the {split} shards in {local}: {exc}") from None


def build_train_loader(cfg: DataConfig, micro_batch_size: int) -> StreamingDataLoader:
    """The training stream for this rank (streaming partitions samples by data-parallel rank)."""
    dataset = _dataset(cfg, "train", micro_batch_size, cfg.shuffle)
    return StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        num_workers=cfg.num_workers,
        drop_last=True,
        persistent_workers=False,
    )


def load_eval_set(cfg: DataConfig, max_samples: int) -> torch.Tensor:
    """The first max_samples held-out samples, [N, seq_len + 1], the same in every run."""
    dataset = _dataset(cfg, "eval", 1, shuffle=False)
    n = min(max_samples, dataset.num_samples)
    return torch.stack([dataset[i] for i in range(n)])
