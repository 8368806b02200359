"""arch: the models. Blocks, mixers, FFNs, residual updates, preconditioners and their registries.

Imports only torch and the standard library (safetensors lazily, for `arch.hf`); never
`trainer`, `launch` or `data_pipeline`, not even inside a function. `arch.registry` is the
dependency-free leaf that every package may import, `data_pipeline` included (the one module of
`arch` it may import). Enforced by tests/test_package_rules.py.
"""

from arch import (  # noqa: F401  (register built-ins)
    attention,
    attention_sparse,
    mamba,
    mamba2,
    mlp,
    moe,
    pc_layer,
    preconditioner,
    residual,
    residual_adaptive,
    residual_momentum,
)
from arch.config import ModelConfig, validate_model_config
from arch.layers_registry import ATTENTION, FFNS, MIXERS, PRECONDITIONERS, RESIDUALS
from arch.model import HybridLM, build_model, count_parameters, lm_loss

__all__ = [
    "ATTENTION",
    "FFNS",
    "MIXERS",
    "PRECONDITIONERS",
    "RESIDUALS",
    "HybridLM",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "lm_loss",
    "validate_model_config",
]
