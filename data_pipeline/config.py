"""The data config: where the MDS shards are and how they are made and read."""

from __future__ import annotations

from dataclasses import dataclass, field

from arch.registry import ConfigError


@dataclass
class SourceConfig:
    """One prepared data set of a mixture (data.sources)."""

    path: str  # prepared MDS directory (the local cache when `remote` is set)
    weight: float = 1.0  # share of every batch, relative to the other sources' weights
    remote: str | None = None


@dataclass
class DataConfig:
    path: str = "runs/data/${data.dataset}-${data.tokenizer}-${trainer.seq_len}"  # local MDS dir
    remote: str | None = None  # where shards are streamed from into `path` (dir or s3://)
    cache_limit: str | None = None  # with a remote: evict shards beyond this size ("2gb")
    dataset: str = "stdlib"  # corpus that `prepare-data` (or the first train run) tokenizes
    inputs: list[str] = field(default_factory=list)  # files, directories, globs (dataset=files)
    text_field: str = "text"  # the field holding the text in .jsonl / .parquet inputs
    skip_bad: bool = False  # skip (and count) bad records instead of stopping at the first
    tokenizer: str = "byte"
    tokenizer_path: str | None = None  # tokenizer.json or a directory with one (tokenizer=hf)
    workers: int = 1  # tokenizer processes for prepare-data
    max_bytes: int | None = None  # cap on the corpus size read (None: all of it)
    eval_fraction: float = 0.02  # share of documents held out for evaluation
    shard_size_bytes: int = 1 << 22
    shuffle: bool = True
    shuffle_seed: int = 17
    num_workers: int = 0  # data-loader worker processes per rank
    prepare_if_missing: bool = True  # build `path` from `dataset` when it does not exist yet
    # Keep the documents packed into one sample apart: attention masks and Mamba state resets
    # at end-of-document tokens (off: documents see their predecessors, GPT-style).
    document_masking: bool = False
    # A mixture: several prepared data sets, each batch split among them by weight. When set,
    # it replaces path/remote for training and evaluation.
    sources: list[SourceConfig] = field(default_factory=list)

    def resolved_sources(self) -> list[SourceConfig]:
        return list(self.sources) or [SourceConfig(path=self.path, remote=self.remote)]


def validate_data_config(cfg: DataConfig) -> None:
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise ConfigError("data.eval_fraction", f"must be in (0, 1), got {cfg.eval_fraction}")
    for i, source in enumerate(cfg.sources):
        if source.weight <= 0:
            raise ConfigError(f"data.sources.{i}.weight", f"must be positive, got {source.weight}")
    if cfg.workers < 1:
        raise ConfigError("data.workers", f"must be >= 1, got {cfg.workers}")
    if cfg.num_workers < 0:
        raise ConfigError("data.num_workers", f"must be >= 0, got {cfg.num_workers}")
    if cfg.max_bytes is not None and cfg.max_bytes <= 0:
        raise ConfigError("data.max_bytes", f"must be positive or null, got {cfg.max_bytes}")
    if cfg.shard_size_bytes < 1 << 12:
        raise ConfigError("data.shard_size_bytes", f"must be >= 4096, got {cfg.shard_size_bytes}")
