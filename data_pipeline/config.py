"""The data config: where the MDS shards are and how they are made and read."""

from __future__ import annotations

from dataclasses import dataclass

from arch.registry import ConfigError


@dataclass
class DataConfig:
    path: str = "runs/data/${data.dataset}-${data.tokenizer}-${trainer.seq_len}"  # local MDS dir
    remote: str | None = None  # where shards are streamed from into `path` (dir or s3://)
    dataset: str = "stdlib"  # corpus that `prepare-data` (or the first train run) tokenizes
    source: str | None = None  # file or directory, for corpora that read one (text, jsonl)
    tokenizer: str = "byte"
    max_bytes: int | None = None  # cap on the corpus size read (None: all of it)
    eval_fraction: float = 0.02  # share of documents held out for evaluation
    shard_size_bytes: int = 1 << 22
    shuffle: bool = True
    shuffle_seed: int = 17
    num_workers: int = 0  # data-loader worker processes per rank
    prepare_if_missing: bool = True  # build `path` from `dataset` when it does not exist yet


def validate_data_config(cfg: DataConfig) -> None:
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise ConfigError("data.eval_fraction", f"must be in (0, 1), got {cfg.eval_fraction}")
    if cfg.num_workers < 0:
        raise ConfigError("data.num_workers", f"must be >= 0, got {cfg.num_workers}")
    if cfg.max_bytes is not None and cfg.max_bytes <= 0:
        raise ConfigError("data.max_bytes", f"must be positive or null, got {cfg.max_bytes}")
    if cfg.shard_size_bytes < 1 << 12:
        raise ConfigError("data.shard_size_bytes", f"must be >= 4096, got {cfg.shard_size_bytes}")
