"""`LlamaForCausalLM` <-> HybridLM: every layer attention + SwiGLU MLP, pattern ``"*-" * L``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arch.config import ModelConfig
from arch.hf.base import HFAdapter, register_family, rope_fields, rope_theta


@register_family
class LlamaAdapter(HFAdapter):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    defaults = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_key_value_heads": None}

    def pattern(self, hf: Mapping[str, Any], layers: int) -> str:
        return "*-" * layers

    def configure(self, cfg: ModelConfig, hf: Mapping[str, Any]) -> None:
        cfg.attention.rope = True
        cfg.attention.rope_theta = rope_theta(self, hf)

    def exports(self, mixers: list[str], ffns: list[str]) -> bool:
        return "mamba" not in mixers and "moe" not in ffns

    def family_fields(self, cfg: ModelConfig, mixers: list[str], ffns: list[str]) -> dict:
        return {**rope_fields(cfg, self.architecture), "mlp_bias": False}
