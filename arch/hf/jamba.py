"""`JambaForCausalLM` <-> HybridLM: Mamba / attention mixers, MLP / MoE FFNs.

The layout is the one Jamba's (period, offset) pairs give (`arch.layouts.jamba_pattern`). The
model is built with Jamba's semantics: no RoPE, Jamba's dt/B/C norms, a router without
renormalisation, experts as wide as the dense MLP. Both state-dict forms are read: the on-disk
one (per-expert ``experts.{e}.{gate,up,down}_proj``, transformers 4.x in memory) and
transformers 5.x's in-memory fused ``experts.gate_up_proj`` / ``experts.down_proj``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from arch.config import ModelConfig
from arch.hf.base import (
    MLP_NAMES,
    HFAdapter,
    HFInteropError,
    WeightPairs,
    cannot_export,
    mlp_pairs,
    moe_pairs,
    register_family,
    unfuse_experts,
    unsupported,
)
from arch.layouts import jamba_pattern

MAMBA_KEYS = (
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
    "dt_layernorm.weight",
    "b_layernorm.weight",
    "c_layernorm.weight",
)


@register_family
class JambaAdapter(HFAdapter):
    model_type = "jamba"
    architecture = "JambaForCausalLM"
    defaults = {
        "rms_norm_eps": 1e-6,
        "num_key_value_heads": 8,
        "num_experts": 16,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 8,
        "attn_layer_offset": 4,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_dt_rank": "auto",
        "mamba_conv_bias": True,
    }
    final_norm = "model.final_layernorm.weight"
    ffn_norm = "pre_ff_layernorm"

    def check_expressible(self, hf: Mapping[str, Any]) -> None:
        super().check_expressible(hf)
        if hf.get("mamba_proj_bias"):
            raise unsupported(
                "mamba_proj_bias",
                hf["mamba_proj_bias"],
                "HybridLM has no Mamba in_proj/out_proj with a bias",
            )
        if hf.get("mamba_inner_layernorms") is False:
            raise unsupported("mamba_inner_layernorms", False, "Jamba's dt/B/C norms are required")

    def pattern(self, hf: Mapping[str, Any], layers: int) -> str:
        keys = (
            "attn_layer_period",
            "attn_layer_offset",
            "expert_layer_period",
            "expert_layer_offset",
        )
        return jamba_pattern(layers, *(int(self.get(hf, k)) for k in keys))

    def configure(self, cfg: ModelConfig, hf: Mapping[str, Any]) -> None:
        cfg.attention.rope = False
        m = cfg.mamba
        m.d_state = int(self.get(hf, "mamba_d_state"))
        m.d_conv = int(self.get(hf, "mamba_d_conv"))
        m.expand = int(self.get(hf, "mamba_expand"))
        rank = self.get(hf, "mamba_dt_rank")
        m.dt_rank = math.ceil(cfg.d_model / 16) if rank == "auto" else int(rank)
        m.dt_norms = True
        m.conv_bias = bool(self.get(hf, "mamba_conv_bias"))
        self.configure_moe(cfg, hf, int(self.get(hf, "num_experts")))
        cfg.moe.renormalize = False

    def exports(self, mixers: list[str], ffns: list[str]) -> bool:
        return "mamba" in mixers

    def family_fields(self, cfg: ModelConfig, mixers: list[str], ffns: list[str]) -> dict:
        if cfg.attention.rope:
            raise cannot_export("attention.rope", True, "Jamba has no RoPE")
        if not cfg.mamba.dt_norms:
            raise cannot_export("mamba.dt_norms", False, "Jamba's Mamba has dt/B/C norms")
        if cfg.moe.renormalize and "moe" in ffns:
            raise cannot_export("moe.renormalize", True, "Jamba's router does not renormalise")
        attn_period, attn_offset = period_offset(
            cfg, [m == "attention" for m in mixers], "attention"
        )
        exp_period, exp_offset = period_offset(cfg, [f == "moe" for f in ffns], "MoE")
        return {
            "attn_layer_period": attn_period,
            "attn_layer_offset": attn_offset,
            "expert_layer_period": exp_period,
            "expert_layer_offset": exp_offset,
            "num_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "router_aux_loss_coef": cfg.moe.aux_loss_weight,
            "mamba_d_state": cfg.mamba.d_state,
            "mamba_d_conv": cfg.mamba.d_conv,
            "mamba_expand": cfg.mamba.expand,
            "mamba_dt_rank": cfg.mamba.rank(cfg.d_model),
            "mamba_conv_bias": cfg.mamba.conv_bias,
            "mamba_proj_bias": False,
        }

    def mixer_pairs(self, plugin: str, ours: str, src: str, cfg: ModelConfig) -> WeightPairs:
        if plugin != "mamba":
            yield from super().mixer_pairs(plugin, ours, src, cfg)
            return
        for key in MAMBA_KEYS:
            if key != "conv1d.bias" or cfg.mamba.conv_bias:
                yield f"{ours}.{key}", f"{src}.mamba.{key}"

    def ffn_pairs(self, plugin: str, ours: str, src: str, cfg: ModelConfig) -> WeightPairs:
        ff = f"{src}.feed_forward"
        if plugin == "mlp":
            yield from mlp_pairs(ours, ff, MLP_NAMES)
        elif plugin == "moe":
            yield from moe_pairs(ours, ff, "router", MLP_NAMES, cfg)
        else:
            raise HFInteropError(f"{self.architecture} has no {plugin!r} FFN")

    def on_disk_names(self, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return unfuse_experts(hf_state, ("gate_proj", "up_proj"), "down_proj")


def period_offset(cfg: ModelConfig, flags: list[bool], what: str) -> tuple[int, int]:
    """The smallest (period, offset) with flags[i] == (i % period == offset), as Jamba writes."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(f == (i % period == offset) for i, f in enumerate(flags)):
                return period, offset
    layout = "".join("x" if f else "." for f in flags)
    raise cannot_export(
        "pattern", layout, f"the {what} layers do not follow Jamba's period/offset rule"
    )
