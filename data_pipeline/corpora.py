"""Built-in corpora (registry `dataset`): where documents come from.

A corpus is a class with ``fingerprint(cfg) -> dict`` (what identifies its content, so that
preparing the same data twice is a no-op) and ``documents(cfg, report) -> Iterator[str]``
(documents in a fixed order).
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import DataConfig
from data_pipeline.registries import DATASETS
from data_pipeline.sources import (
    IngestReport,
    expand_inputs,
    hash_files,
    named_files,
    read_documents,
)


def capped(docs: Iterator[str], max_bytes: int | None) -> Iterator[str]:
    """Stop once ``max_bytes`` characters have been yielded (None: no cap)."""
    total = 0
    for doc in docs:
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(doc)
        yield doc


@DATASETS.register("stdlib")
class StdlibCorpus:
    """Text that ships with Python: the documentation topics, then the top-level stdlib modules."""

    def fingerprint(self, cfg: DataConfig) -> dict:
        return {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"]}

    def documents(self, cfg: DataConfig, report: IngestReport) -> Iterator[str]:
        import pydoc_data.topics

        def docs() -> Iterator[str]:
            topics = pydoc_data.topics.topics
            for name in sorted(topics):
                yield topics[name]
            for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
                yield path.read_text(encoding="utf-8", errors="replace")

        return capped(docs(), cfg.max_bytes)


@DATASETS.register("files")
class FilesCorpus:
    """Files named by data.inputs: .txt/.md (a document each), .jsonl[.gz|.zst] and .parquet (data.text_field)."""

    def fingerprint(self, cfg: DataConfig) -> dict:
        return {"files": hash_files(expand_inputs(list(cfg.inputs))), "text_field": cfg.text_field}

    def documents(self, cfg: DataConfig, report: IngestReport) -> Iterator[str]:
        inputs = list(cfg.inputs)
        files = expand_inputs(inputs, report)
        docs = read_documents(files, cfg.text_field, report, cfg.skip_bad, named_files(inputs))
        return capped(docs, cfg.max_bytes)
