"""The data plugin registries.

- ``tokenizer``: a class built by ``cls.load(path)``; see `data_pipeline.tokenizers`.
- ``dataset``: a corpus class with ``fingerprint(cfg)`` and ``documents(cfg, report)``; see
  `data_pipeline.corpora`.
"""

from __future__ import annotations

from arch.registry import Registry

TOKENIZERS: Registry = Registry("tokenizer", "text <-> token ids")
DATASETS: Registry = Registry("dataset", "corpora that prepare-data tokenizes into MDS shards")
