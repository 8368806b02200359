"""data_pipeline: tokenizers, corpus -> MDS shards, streaming loaders.

Imports torch, numpy and mosaicml-streaming, plus the dependency-free `arch.registry` leaf for
the shared Registry and error types; never `trainer`, `launch` or the rest of `arch`.
"""

from data_pipeline import corpora, tokenizers  # noqa: F401  (register built-ins)
from data_pipeline.config import DataConfig, validate_data_config
from data_pipeline.loader import build_train_loader, check_prepared, load_eval_set
from data_pipeline.prepare import prepare_data, read_manifest
from data_pipeline.registries import DATASETS, TOKENIZERS

__all__ = [
    "DATASETS",
    "TOKENIZERS",
    "DataConfig",
    "build_train_loader",
    "check_prepared",
    "load_eval_set",
    "prepare_data",
    "read_manifest",
    "validate_data_config",
]
