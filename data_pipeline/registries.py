"""The data plugin registries.

- ``tokenizer``: a class with ``vocab_size``, ``eos_id``, ``encode(str) -> list[int]`` and
  ``decode(list[int]) -> str``, built as ``cls()``.
- ``dataset``: a corpus, ``fn(source: str | None, max_bytes: int | None) -> Iterator[str]``
  yielding documents in a fixed order.
"""

from __future__ import annotations

from arch.registry import Registry

TOKENIZERS: Registry = Registry("tokenizer", "text <-> token ids")
DATASETS: Registry = Registry("dataset", "corpora that prepare-data tokenizes into MDS shards")
