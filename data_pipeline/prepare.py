"""Corpus -> tokenized, packed MDS shards (train/ and eval/), written atomically.

Documents are tokenized, each followed by the tokenizer's end-of-document token, concatenated per
split and cut into samples of ``seq_len + 1`` tokens (inputs and shifted targets).

The held-out split, by the corpus's size in documents:

- enough documents that about ``MIN_EVAL_DOCUMENTS`` of them go to eval: whole documents, the
  ones whose index falls in a low-discrepancy (golden-ratio) sequence, so the held-out share is
  close to ``eval_fraction`` at any size and no position (the first document included) is
  favoured;
- fewer (one big text file, a handful of books): the last ``eval_fraction`` of the token stream,
  as nanoGPT does with its input.txt; per-document, one document would be the whole eval set or
  none of it.

Both depend only on the document stream, never on the number of tokenizer workers. The directory
is built under a temporary name and renamed, and ``hybridtron_data.json`` (the manifest) says
what it holds.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from arch.registry import UserError
from data_pipeline.config import DataConfig
from data_pipeline.registries import DATASETS
from data_pipeline.sources import IngestReport
from data_pipeline.streaming_compat import MDSWriter
from data_pipeline.tokenizers import load_tokenizer

MANIFEST = "hybridtron_data.json"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
_GOLDEN = 0.6180339887498949


@dataclass
class PreparedData:
    path: Path
    manifest: dict
    up_to_date: bool = False  # the directory already held exactly this data

    def samples(self, split: str) -> int:
        return self.manifest["splits"][split]["samples"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


MIN_EVAL_DOCUMENTS = 4


def is_eval_document(index: int, eval_fraction: float) -> bool:
    """Whether document ``index`` (from 0) is held out: frac((index + 1) * golden) < fraction.

    Counting from 1 matters: frac(0) = 0 would send the first document to eval at any fraction.
    """
    return ((index + 1) * _GOLDEN) % 1.0 < eval_fraction


def documents_for_a_split_by_document(eval_fraction: float) -> int:
    """The fewest documents split per document; a smaller corpus is split by tokens."""
    return math.ceil(MIN_EVAL_DOCUMENTS / eval_fraction)


def eval_tail_tokens(total_tokens: int, eval_fraction: float) -> int:
    """Tokens held out at the end of a corpus split by tokens."""
    return round(total_tokens * eval_fraction)


class _Packer:
    """Cuts a token stream into fixed-length samples and writes them to one MDS split."""

    def __init__(self, out: Path, sample_len: int, dtype: np.dtype, shard_size: int) -> None:
        self.sample_len, self.dtype = sample_len, dtype
        self.buffer = np.zeros(0, dtype=dtype)
        self.samples = self.tokens = 0
        self.received = self.documents = 0  # all tokens / documents given, leftovers included
        self.writer = MDSWriter(
            out=str(out),
            columns={"tokens": f"ndarray:{dtype.name}"},
            compression="zstd",
            hashes=["xxh64"],
            size_limit=shard_size,
        )

    def add(self, ids: np.ndarray) -> None:
        self.received += len(ids)
        self.buffer = np.concatenate([self.buffer, ids.astype(self.dtype, copy=False)])
        n_full = len(self.buffer) // self.sample_len
        for row in self.buffer[: n_full * self.sample_len].reshape(n_full, self.sample_len):
            self.writer.write({"tokens": row})
        self.buffer = self.buffer[n_full * self.sample_len :]
        self.samples += n_full
        self.tokens += n_full * self.sample_len

    def finish(self) -> dict:
        self.writer.finish()
        return {"samples": self.samples, "tokens": self.tokens}


class _Splitter:
    """Routes each document's tokens to the train or eval packer (see the module's docstring).

    The first documents wait until the corpus proves large enough for a split by document;
    one that ends sooner has all of its tokens here and is split by tokens in ``finish``.
    """

    def __init__(self, packers: dict[str, _Packer], eval_fraction: float) -> None:
        self.packers, self.eval_fraction = packers, eval_fraction
        self.waiting: list[np.ndarray] | None = []
        self.minimum = documents_for_a_split_by_document(eval_fraction)
        self.documents = 0
        self.mode = "documents"

    def add(self, doc: np.ndarray) -> None:
        self.documents += 1
        if self.waiting is None:
            self._route(self.documents - 1, doc)
            return
        self.waiting.append(doc)
        if len(self.waiting) == self.minimum:
            waiting, self.waiting = self.waiting, None
            for index, held in enumerate(waiting):
                self._route(index, held)

    def _route(self, index: int, doc: np.ndarray) -> None:
        split = "eval" if is_eval_document(index, self.eval_fraction) else "train"
        self.packers[split].add(doc)
        self.packers[split].documents += 1

    def finish(self) -> None:
        if self.waiting is None:
            return
        self.mode = "tokens"
        stream = np.concatenate(self.waiting) if self.waiting else np.zeros(0, np.int64)
        cut = len(stream) - eval_tail_tokens(len(stream), self.eval_fraction)
        self.packers["train"].add(stream[:cut])
        self.packers["eval"].add(stream[cut:])
        self.waiting = None

    def too_small(self, split: str, sample_len: int, dataset: str) -> str:
        """Why ``split`` has no sample, with the fixes that can help."""
        packer = self.packers[split]
        if self.mode == "documents":
            where = f"{packer.documents} of {self.documents} documents"
        else:
            total = sum(p.received for p in self.packers.values())
            where = (
                f"{'the last' if split == 'eval' else 'the first'} {packer.received} of {total} "
                f"tokens: {self.documents} document(s), fewer than {self.minimum}, are split by "
                f"tokens"
            )
        other = "larger" if split == "eval" else "smaller"
        return (
            f"the {split} split of data.dataset={dataset} has {packer.received} tokens ({where}), "
            f"less than one sample of {sample_len} tokens; use more data, a shorter "
            f"trainer.seq_len or a {other} data.eval_fraction (now {self.eval_fraction})"
        )


_worker_tokenizer = None


def _init_worker(name: str, path: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(name, path)


def _encode_batch(texts: list[str]) -> list[tuple[int, list[int]]]:
    """(characters, token ids) per text: workers send back sizes, not the texts themselves."""
    tok = _worker_tokenizer
    ids = (
        tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    )
    return [(len(t), i) for t, i in zip(texts, ids, strict=True)]


def _batched(
    docs: Iterator[str], max_docs: int = 64, max_chars: int = 1 << 18
) -> Iterator[list[str]]:
    """Work units for the tokenizer processes: up to ``max_docs`` documents or ``max_chars``
    characters, so a corpus of a few large files still spreads over the workers."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) == max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_documents(
    docs: Iterator[str], cfg: DataConfig, workers: int
) -> Iterator[tuple[int, list[int]]]:
    """(characters, token ids) for every document, in input order, over ``workers`` processes.

    ``imap`` keeps the input order, so the shards are identical for any number of workers.
    """
    batches = _batched(docs)
    if workers == 1:
        _init_worker(cfg.tokenizer, cfg.tokenizer_path)
        for texts in batches:
            yield from _encode_batch(texts)
        return
    ctx = multiprocessing.get_context("fork")
    init = (cfg.tokenizer, cfg.tokenizer_path)
    with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
        for encoded in pool.imap(_encode_batch, batches):
            yield from encoded


def data_fingerprint(cfg: DataConfig, seq_len: int, tokenizer) -> dict:
    """Everything that decides the shards' content: same fingerprint, same data."""
    return {
        "dataset": cfg.dataset,
        "corpus": DATASETS.get(cfg.dataset)().fingerprint(cfg),
        "tokenizer": tokenizer.fingerprint(),
        "seq_len": seq_len,
        "eval_fraction": cfg.eval_fraction,
        "max_bytes": cfg.max_bytes,
        "skip_bad": cfg.skip_bad,
    }


def prepare_data(
    cfg: DataConfig, seq_len: int, *, overwrite: bool = False, progress: bool = True
) -> PreparedData:
    """Tokenize ``cfg.dataset`` into MDS shards at ``cfg.path`` for samples of seq_len + 1 tokens.

    Preparing the same inputs with the same settings again is a no-op (the manifest's
    fingerprint matches); different data over an existing directory needs ``overwrite``.
    """
    out = Path(cfg.path)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
    fingerprint = data_fingerprint(cfg, seq_len, tokenizer)
    if out.exists():
        existing = _existing_manifest(out)
        if existing is not None and existing.get("fingerprint") == fingerprint:
            return PreparedData(out, existing, up_to_date=True)
        if not overwrite:
            raise UserError(
                f"data.path {out} holds other data; pass --overwrite or choose another data.path"
            )
    corpus = DATASETS.get(cfg.dataset)()
    report = IngestReport()
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    started = time.time()
    packers = {s: _Packer(tmp / s, seq_len + 1, dtype, cfg.shard_size_bytes) for s in SPLITS}
    splitter = _Splitter(packers, cfg.eval_fraction)
    n_bytes = 0
    try:
        docs = corpus.documents(cfg, report)
        # A context manager: the bar is cleared before an error is printed, not after it.
        with tqdm(
            desc="tokenizing", unit="doc", disable=not progress, leave=False, file=sys.stderr
        ) as bar:
            for chars, ids in encode_documents(docs, cfg, cfg.workers):
                splitter.add(np.array([*ids, tokenizer.eos_id], dtype=dtype))
                n_bytes += chars
                bar.update(1)
                bar.set_postfix_str(
                    f"{sum(p.received for p in packers.values()) / 1e6:.1f}M tokens", refresh=False
                )
        splitter.finish()
        splits = {s: p.finish() for s, p in packers.items()}
        n_docs = splitter.documents
        if n_docs == 0:
            raise UserError(f"data.dataset={cfg.dataset} yielded no document; check the inputs")
        for split, stats in splits.items():
            if stats["samples"] == 0:
                raise UserError(splitter.too_small(split, seq_len + 1, cfg.dataset))
    except UserError as exc:
        for line in report.summary():  # what was skipped explains many failures
            exc.add_note(line)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tokenizer.save(tmp)
    seconds = time.time() - started
    manifest = {
        "format": FORMAT_VERSION,
        "dataset": cfg.dataset,
        "tokenizer": cfg.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "seq_len": seq_len,
        "documents": n_docs,
        "characters": n_bytes,
        "tokens": sum(stats["tokens"] for stats in splits.values()),
        "skipped_records": report.skipped,
        "skipped_examples": report.skipped_examples,
        "skipped_empty_files": report.empty_files,
        "skipped_other_files": report.other_files,
        "skip_summary": report.summary(),
        "eval_split": splitter.mode,  # "documents" or "tokens" (the tail of a small corpus)
        "splits": splits,
        "seconds": round(seconds, 2),
        "workers": cfg.workers,
        "fingerprint": fingerprint,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return PreparedData(out, manifest)


def _existing_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


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
