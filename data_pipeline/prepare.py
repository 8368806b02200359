"""Corpus -> tokenized, packed MDS shards (train/ and eval/), written atomically.

Documents are tokenized, each followed by the tokenizer's end-of-document token, concatenated per
split and cut into samples of ``seq_len + 1`` tokens (inputs and shifted targets). A document goes
to eval when its index falls in a low-discrepancy sequence, so the held-out share is close to
``eval_fraction`` for any corpus size. The directory is built under a temporary name and renamed,
and ``hybridtron_data.json`` (the manifest) says what it holds.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arch.registry import UserError
from data_pipeline.config import DataConfig
from data_pipeline.registries import DATASETS, TOKENIZERS
from data_pipeline.streaming_compat import MDSWriter

MANIFEST = "hybridtron_data.json"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
_GOLDEN = 0.6180339887498949


@dataclass
class PreparedData:
    path: Path
    manifest: dict

    def samples(self, split: str) -> int:
        return self.manifest["splits"][split]["samples"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def is_eval_document(index: int, eval_fraction: float) -> bool:
    return (index * _GOLDEN) % 1.0 < eval_fraction


class _Packer:
    """Cuts a token stream into fixed-length samples and writes them to one MDS split."""

    def __init__(self, out: Path, sample_len: int, dtype: np.dtype, shard_size: int) -> None:
        self.sample_len, self.dtype = sample_len, dtype
        self.buffer = np.zeros(0, dtype=dtype)
        self.samples = self.tokens = 0
        self.writer = MDSWriter(
            out=str(out),
            columns={"tokens": f"ndarray:{dtype.name}"},
            compression="zstd",
            hashes=["xxh64"],
            size_limit=shard_size,
        )

    def add(self, ids: Iterable[int]) -> None:
        self.buffer = np.concatenate([self.buffer, np.fromiter(ids, dtype=self.dtype)])
        n_full = len(self.buffer) // self.sample_len
        for row in self.buffer[: n_full * self.sample_len].reshape(n_full, self.sample_len):
            self.writer.write({"tokens": row})
        self.buffer = self.buffer[n_full * self.sample_len :]
        self.samples += n_full
        self.tokens += n_full * self.sample_len

    def finish(self) -> dict:
        self.writer.finish()
        return {"samples": self.samples, "tokens": self.tokens}


def prepare_data(
    cfg: DataConfig, seq_len: int, *, overwrite: bool = False, progress: bool = True
) -> PreparedData:
    """Tokenize ``cfg.dataset`` into MDS shards at ``cfg.path`` for samples of seq_len + 1 tokens."""
    out = Path(cfg.path)
    if out.exists() and not overwrite:
        raise UserError(
            f"data.path {out} exists already; pass --overwrite or choose another data.path"
        )
    tokenizer = TOKENIZERS.get(cfg.tokenizer)()
    documents = DATASETS.get(cfg.dataset)(cfg.source, cfg.max_bytes)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    started = time.time()
    packers = {s: _Packer(tmp / s, seq_len + 1, dtype, cfg.shard_size_bytes) for s in SPLITS}
    n_docs = n_bytes = 0
    try:
        from tqdm import tqdm

        docs = tqdm(documents, desc="tokenizing", unit="doc", disable=not progress, leave=False)
        for index, text in enumerate(docs):
            split = "eval" if is_eval_document(index, cfg.eval_fraction) else "train"
            packers[split].add([*tokenizer.encode(text), tokenizer.eos_id])
            n_docs, n_bytes = n_docs + 1, n_bytes + len(text)
        splits = {s: p.finish() for s, p in packers.items()}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split, stats in splits.items():
        if stats["samples"] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"the {split} split of data.dataset={cfg.dataset} has no sample of "
                f"{seq_len + 1} tokens ({n_docs} documents, {n_bytes} bytes); use more data "
                f"(data.max_bytes), a shorter trainer.seq_len or another data.eval_fraction"
            )
    manifest = {
        "format": FORMAT_VERSION,
        "dataset": cfg.dataset,
        "source": cfg.source,
        "tokenizer": cfg.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "seq_len": seq_len,
        "documents": n_docs,
        "bytes": n_bytes,
        "splits": splits,
        "seconds": round(time.time() - started, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return PreparedData(out, manifest)


def read_manifest(path: str | Path) -> dict:
    file = Path(path) / MANIFEST
    if not file.exists():
        raise UserError(
            f"{path} holds no prepared data ({MANIFEST} missing); "
            f"run `hybridtron prepare-data data.path={path}` first"
        )
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{file} is corrupt ({exc}); prepare the data again with --overwrite"
        ) from None
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(
            f"{file} has format {manifest.get('format')}, expected {FORMAT_VERSION}; prepare it again"
        )
    return manifest
