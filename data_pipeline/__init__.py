"""data_pipeline: tokenizers, corpus -> MDS shards, streaming loaders.

Imports torch, numpy and mosaicml-streaming, plus the dependency-free `arch.registry` leaf for
the shared Registry and error types; never `trainer`, `launch` or the rest of `arch`, not even
inside a function (enforced by tests/test_package_rules.py).
"""

from data_pipeline import corpora, tokenizers  # noqa: F401  (register built-ins)
from data_pipeline.config import DataConfig, validate_data_config
from data_pipeline.loader import (
    build_train_loader,
    check_prepared,
    data_tokenizer,
    load_eval_set,
    release_loader,
)
from data_pipeline.prepare import prepare_data, read_manifest
from data_pipeline.registries import DATASETS, TOKENIZERS
from data_pipeline.tokenizers import load_tokenizer, train_bpe

__all__ = [
    "DATASETS",
    "TOKENIZERS",
    "DataConfig",
    "build_train_loader",
    "check_prepared",
    "data_tokenizer",
    "load_tokenizer",
    "train_bpe",
    "load_eval_set",
    "prepare_data",
    "read_manifest",
    "release_loader",
    "validate_data_config",
]
