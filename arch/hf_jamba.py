"""Import a Hugging Face Jamba checkpoint (`JambaForCausalLM`) as a HybridLM with logit parity.

Jamba layer i becomes two sub-layers: 2i = its mixer (`M` or `*`) with `input_layernorm` as
pre-norm, 2i+1 = its FFN (`-` or `E`) with `pre_ff_layernorm`. The model is built with Jamba's
semantics: no RoPE, Jamba's dt/B/C norms, a router without renormalisation, one eps for every
RMSNorm, experts as wide as the dense MLP. Both state-dict forms are read: the on-disk one
(per-expert `experts.{e}.{gate,up,down}_proj`, transformers 4.x in memory) and transformers
5.x's in-memory fused `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]`.
Only the config's attributes are read, so this module does not import transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from arch.config import ModelConfig
from arch.layouts import jamba_pattern
from arch.model import HybridLM, build_model

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
ATTENTION_KEYS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
MLP_KEYS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def config_from_hf(hf: Any) -> ModelConfig:
    """The ModelConfig that reproduces a `JambaConfig` (read by attribute)."""
    unsupported = {
        "mamba_proj_bias": getattr(hf, "mamba_proj_bias", False),
        "hidden_act != 'silu'": getattr(hf, "hidden_act", "silu") != "silu",
        "sliding_window": getattr(hf, "sliding_window", None) is not None,
    }
    head_dim = getattr(hf, "head_dim", None)
    unsupported["head_dim != hidden/heads"] = head_dim not in (
        None,
        hf.hidden_size // hf.num_attention_heads,
    )
    if any(unsupported.values()):
        raise ValueError(
            f"Jamba config uses what HybridLM cannot express: "
            f"{', '.join(k for k, v in unsupported.items() if v)}"
        )
    dt_rank = hf.mamba_dt_rank
    cfg = ModelConfig(
        pattern=jamba_pattern(
            hf.num_hidden_layers,
            hf.attn_layer_period,
            hf.attn_layer_offset,
            hf.expert_layer_period,
            hf.expert_layer_offset,
        ),
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        vocab_size=hf.vocab_size,
        ffn_hidden=hf.intermediate_size,
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=hf.initializer_range,
    )
    cfg.attention.rope = False
    cfg.mamba.d_state, cfg.mamba.d_conv, cfg.mamba.expand = (
        hf.mamba_d_state,
        hf.mamba_d_conv,
        hf.mamba_expand,
    )
    cfg.mamba.dt_rank = math.ceil(hf.hidden_size / 16) if dt_rank == "auto" else int(dt_rank)
    cfg.mamba.dt_norms = True
    cfg.mamba.conv_bias = bool(hf.mamba_conv_bias)
    cfg.moe.num_experts = hf.num_experts
    cfg.moe.top_k = hf.num_experts_per_tok
    cfg.moe.renormalize = False
    cfg.moe.expert_hidden = hf.intermediate_size
    cfg.moe.aux_loss_weight = hf.router_aux_loss_coef
    cfg.moe.z_loss_weight = 0.0  # Jamba trains without one
    return cfg


def state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Our state dict (names of `HybridLM(cfg)`) from a Jamba one; vocab rows padded with zeros."""
    sd = {k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in hf_state.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    def pad_vocab(w: torch.Tensor) -> torch.Tensor:
        padded = w.new_zeros(cfg.padded_vocab_size, w.shape[1])
        padded[: w.shape[0]] = w
        return padded

    out["embed.weight"] = pad_vocab(take("embed_tokens.weight"))
    if not cfg.tie_embeddings:
        out["head.weight"] = pad_vocab(take("lm_head.weight"))
    else:
        used.add("lm_head.weight")  # in memory a tied head is listed too, as the same tensor
    out["norm.weight"] = take("final_layernorm.weight")
    for i in range(len(cfg.layers) // 2):
        src, mixer, ffn = f"layers.{i}", f"layers.{2 * i}", f"layers.{2 * i + 1}"
        out[f"{mixer}.norm.weight"] = take(f"{src}.input_layernorm.weight")
        out[f"{ffn}.norm.weight"] = take(f"{src}.pre_ff_layernorm.weight")
        if cfg.layers[2 * i] == "M":
            for key in MAMBA_KEYS:
                if f"{src}.mamba.{key}" in sd:
                    out[f"{mixer}.inner.{key}"] = take(f"{src}.mamba.{key}")
        else:
            for ours, theirs in ATTENTION_KEYS.items():
                out[f"{mixer}.inner.{ours}.weight"] = take(f"{src}.self_attn.{theirs}.weight")
        ff = f"{src}.feed_forward"
        if cfg.layers[2 * i + 1] == "-":
            for ours, theirs in MLP_KEYS.items():
                out[f"{ffn}.inner.{ours}.weight"] = take(f"{ff}.{theirs}.weight")
            continue
        out[f"{ffn}.inner.router.weight"] = take(f"{ff}.router.weight")
        for e in range(cfg.moe.num_experts):
            if f"{ff}.experts.gate_up_proj" in sd:  # transformers 5.x in memory: fused
                gate, up = take(f"{ff}.experts.gate_up_proj")[e].chunk(2, dim=0)
                weights = {"w1": gate, "w3": up, "w2": take(f"{ff}.experts.down_proj")[e]}
            else:
                weights = {
                    ours: take(f"{ff}.experts.{e}.{theirs}.weight")
                    for ours, theirs in MLP_KEYS.items()
                }
            for ours, w in weights.items():
                out[f"{ffn}.inner.experts.{e}.{ours}.weight"] = w
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"Jamba weights not mapped (unsupported option?): {left[:5]}")
    return {k: v.detach().clone() for k, v in out.items()}


def from_hf_jamba(
    hf_model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    hf_config: Any | None = None,
    **overrides: Any,
) -> HybridLM:
    """A HybridLM with a Jamba checkpoint's weights (fp32 logits match HF's to ~1e-6).

    ``hf_config`` defaults to the model's ``.config``; ``overrides`` set ModelConfig fields or
    nested ones with dots, e.g. ``**{"mamba.scan": "loop"}``.
    """
    if isinstance(hf_model_or_state_dict, nn.Module):
        hf_config = hf_config or hf_model_or_state_dict.config
        hf_state = hf_model_or_state_dict.state_dict()
    else:
        hf_state = hf_model_or_state_dict
    if hf_config is None:
        raise ValueError("from_hf_jamba needs hf_config with a state dict")
    cfg = config_from_hf(hf_config)
    for key, value in overrides.items():
        *path, name = key.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    model = build_model(cfg, seed=0)
    model.load_state_dict(state_dict_from_hf(hf_state, cfg), strict=True)
    return model
