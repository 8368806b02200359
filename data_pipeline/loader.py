"""Streaming loaders over prepared MDS shards: the training stream and the held-out eval set."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from arch.registry import UserError
from data_pipeline import shm
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.integrity import verify_split
from data_pipeline.prepare import MANIFEST, read_manifest
from data_pipeline.remote import fetch_file
from data_pipeline.streaming_compat import Stream, StreamingDataLoader, StreamingDataset, World
from data_pipeline.tokenizers import TOKENIZER_FILE, load_tokenizer


class TokenDataset(StreamingDataset):
    """MDS samples of seq_len + 1 tokens, returned as int64 tensors."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(super().__getitem__(index)["tokens"].astype("int64"))


class TokenLoader(StreamingDataLoader):
    """StreamingDataLoader whose position counts the ranks the samples are partitioned over.

    Streaming multiplies the samples this rank yielded by the number of processes; with the
    partition over data-parallel ranks (`_partition_by_data_rank`) the right factor is the
    number of data-parallel ranks (for ``replication`` it is the same as streaming's).
    """

    def state_dict(self) -> dict | None:
        num_samples = self.num_samples_yielded * self.dataset._parallel_rank_world.num_ranks
        return self.dataset.state_dict(num_samples, False)


def data_tokenizer(cfg: DataConfig):
    """The run's tokenizer: from data.tokenizer_path, else the copy saved with the data."""
    return load_tokenizer(cfg.tokenizer, cfg.tokenizer_path or cfg.resolved_sources()[0].path)


def check_prepared(cfg: DataConfig, seq_len: int, vocab_size: int) -> dict:
    """The manifest of the run's data (every source of a mixture), checked against this run."""
    manifests = [
        _check_source(cfg, source, seq_len, vocab_size) for source in cfg.resolved_sources()
    ]
    manifest = dict(manifests[0])
    if len(manifests) > 1:  # the mixture's totals, for the start-up summary
        manifest["splits"] = {
            split: {k: sum(m["splits"][split][k] for m in manifests) for k in ("samples", "tokens")}
            for split in ("train", "eval")
        }
    return manifest


def _check_source(cfg: DataConfig, source: SourceConfig, seq_len: int, vocab_size: int) -> dict:
    if source.remote:
        fetch_file(source.remote, MANIFEST, Path(source.path), required=True)
        fetch_file(source.remote, TOKENIZER_FILE, Path(source.path), required=False)
    manifest = read_manifest(source.path)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_path or source.path)
    if manifest["tokenizer"] != cfg.tokenizer or (
        "fingerprint" in manifest
        and manifest["fingerprint"]["tokenizer"] != tokenizer.fingerprint()
    ):
        raise UserError(
            f"data at {source.path} was tokenized with {manifest['tokenizer']!r} "
            f"({manifest.get('fingerprint', {}).get('tokenizer')}), not with the run's "
            f"data.tokenizer={cfg.tokenizer!r} (data.tokenizer_path={cfg.tokenizer_path}); "
            f"use the same tokenizer or prepare the data again"
        )
    if manifest["seq_len"] != seq_len:
        raise UserError(
            f"data at {source.path} was prepared for seq_len {manifest['seq_len']}, the run uses "
            f"trainer.seq_len={seq_len}; set data.path to a new directory (it is prepared on first use)"
        )
    if manifest["vocab_size"] > vocab_size:
        raise UserError(
            f"data at {source.path} uses tokenizer {manifest['tokenizer']!r} with "
            f"{manifest['vocab_size']} tokens but model.vocab_size={vocab_size}; raise model.vocab_size"
        )
    return manifest


def _dataset(
    cfg: DataConfig,
    split: str,
    batch_size: int,
    shuffle: bool,
    replication: int = 1,
    data_parallel: tuple[int, int] | None = None,
) -> TokenDataset:
    sources = cfg.resolved_sources()
    total = sum(s.weight for s in sources)
    for source in sources:
        if not source.remote:
            verify_split(Path(source.path) / split)

    def streams() -> list[Stream]:
        # New Stream objects for every attempt: a failed StreamingDataset has already written
        # its sampling choice into the ones it was given, and a second dataset refuses them.
        return [
            Stream(
                local=str(Path(s.path) / split),
                remote=f"{s.remote.rstrip('/')}/{split}" if s.remote else None,
                proportion=s.weight / total if len(sources) > 1 else None,
            )
            for s in sources
        ]

    shm.clean_stale()
    try:
        for attempt in range(5):
            try:
                dataset = TokenDataset(
                    streams=streams(),
                    shuffle=shuffle,
                    shuffle_seed=cfg.shuffle_seed,
                    batch_size=batch_size,
                    # With several sources every batch is split among them by weight.
                    batching_method="stratified" if len(sources) > 1 else "random",
                    validate_hash="xxh64",
                    cache_limit=cfg.cache_limit,
                    replication=replication if replication > 1 else None,
                )
                break
            except FileExistsError:
                # Two processes starting at once can pick the same free shared-memory prefix;
                # the loser retries after a short random wait.
                if attempt == 4:
                    raise
                time.sleep(random.uniform(0.05, 0.5))
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        where = ", ".join(s.path for s in sources)
        raise UserError(f"cannot open the {split} shards in {where}: {exc}") from None
    if data_parallel is not None:
        _partition_by_data_rank(dataset, *data_parallel)
    return dataset


def _partition_by_data_rank(dataset: TokenDataset, data_rank: int, data_world: int) -> None:
    """Partition samples over the data-parallel ranks only, whatever the process's rank.

    Streaming partitions over consecutive process ranks (``replication`` groups neighbours), but
    in Megatron's rank order the pipeline peers of a data-parallel rank are not neighbours. Every
    process still coordinates shared memory as itself (``_unique_rank_world``); only the world
    it iterates as (``_parallel_rank_world``) becomes rank ``data_rank`` of ``data_world``, so
    all tensor- and pipeline-parallel peers read identical batches, on any node layout.
    """
    ranks_per_node = dataset._unique_rank_world.ranks_per_node
    nodes = data_world // ranks_per_node if data_world % ranks_per_node == 0 else 1
    workers = dataset._unique_rank_world.workers_per_rank
    dataset._parallel_rank_world = World(
        num_nodes=nodes,
        ranks_per_node=data_world // nodes,
        workers_per_rank=workers,
        worker=data_rank * workers,
    )
    dataset.length = math.ceil(dataset.epoch_size / data_world)


def build_train_loader(
    cfg: DataConfig,
    micro_batch_size: int,
    replication: int = 1,
    data_parallel: tuple[int, int] | None = None,
) -> StreamingDataLoader:
    """The training stream for this rank.

    Streaming partitions samples over the processes; ``replication`` consecutive ranks receive
    identical batches. ``data_parallel=(rank, world)`` partitions over data-parallel ranks
    instead, so every tensor- and pipeline-parallel peer of a rank reads its batches.
    """
    dataset = _dataset(cfg, "train", micro_batch_size, cfg.shuffle, replication, data_parallel)
    return TokenLoader(
        dataset,
        batch_size=micro_batch_size,
        num_workers=cfg.num_workers,
        drop_last=True,
        persistent_workers=False,
    )


def release_loader(loader: StreamingDataLoader) -> None:
    """Free the loader's shared memory now (see `data_pipeline.shm.release`)."""
    shm.release(loader.dataset)


def load_eval_set(cfg: DataConfig, max_samples: int) -> torch.Tensor:
    """Up to max_samples held-out samples [N, seq_len + 1], the same in every run.

    A mixture contributes from each source in proportion to its weight.
    """
    sources = cfg.resolved_sources()
    total = sum(s.weight for s in sources)
    chunks = []
    for source in sources:
        single = DataConfig(path=source.path, remote=source.remote, shuffle_seed=cfg.shuffle_seed)
        dataset = _dataset(single, "eval", 1, shuffle=False)
        n = min(max(1, round(max_samples * source.weight / total)), dataset.num_samples)
        chunks += [dataset[i] for i in range(n)]
        shm.release(dataset)
    return torch.stack(chunks)
