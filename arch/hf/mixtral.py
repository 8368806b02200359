"""`MixtralForCausalLM` <-> HybridLM: every layer attention + MoE, pattern ``"*E" * L``.

Mixtral's router renormalises the top-k weights; its experts are SwiGLU ``w1``/``w3``/``w2``
(ours too) under ``block_sparse_moe`` on disk (transformers 5.x: ``mlp`` and fused in memory).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from arch.config import ModelConfig
from arch.hf.base import (
    HFAdapter,
    HFInteropError,
    WeightPairs,
    cannot_export,
    moe_pairs,
    register_family,
    rope_fields,
    rope_theta,
    unfuse_experts,
)

EXPERT_NAMES = {"w1": "w1", "w3": "w3", "w2": "w2"}


@register_family
class MixtralAdapter(HFAdapter):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    defaults = {
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
    }

    def pattern(self, hf: Mapping[str, Any], layers: int) -> str:
        return "*E" * layers

    def configure(self, cfg: ModelConfig, hf: Mapping[str, Any]) -> None:
        cfg.attention.rope = True
        cfg.attention.rope_theta = rope_theta(self, hf)
        self.configure_moe(cfg, hf, int(self.get(hf, "num_local_experts")))
        cfg.moe.renormalize = True

    def exports(self, mixers: list[str], ffns: list[str]) -> bool:
        return "mamba" not in mixers and "moe" in ffns

    def family_fields(self, cfg: ModelConfig, mixers: list[str], ffns: list[str]) -> dict:
        if "mlp" in ffns:
            raise cannot_export(
                "pattern", cfg.pattern, "Mixtral needs every FFN to be MoE ('*E' * L)"
            )
        fields = rope_fields(cfg, self.architecture)
        if not cfg.moe.renormalize:
            raise cannot_export("moe.renormalize", False, "Mixtral renormalises the top-k weights")
        return {
            **fields,
            "num_local_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "router_aux_loss_coef": cfg.moe.aux_loss_weight,
            "sliding_window": None,
        }

    def ffn_pairs(self, plugin: str, ours: str, src: str, cfg: ModelConfig) -> WeightPairs:
        if plugin != "moe":
            raise HFInteropError(f"{self.architecture} has no {plugin!r} FFN")
        yield from moe_pairs(ours, f"{src}.block_sparse_moe", "gate", EXPERT_NAMES, cfg)

    def on_disk_names(self, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return unfuse_experts(
            hf_state, ("w1", "w3"), "w2", lambda key: key.replace(".mlp.", ".block_sparse_moe.")
        )
