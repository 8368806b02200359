"""Hugging Face interop: `LlamaForCausalLM`, `MixtralForCausalLM` and `JambaForCausalLM` <-> HybridLM.

An HF decoder layer i becomes two sub-layers of our pattern: 2i = its mixer (`*` attention or
`M` Mamba) with the layer's first RMSNorm as pre-norm, 2i+1 = its FFN (`-` SwiGLU MLP or `E`
MoE) with the second. So Llama is ``"*-" * L``, Mixtral ``"*E" * L`` and Jamba the layout its
(period, offset) pairs give (`arch.layouts.jamba_pattern`).

Semantics that line up without any weight permutation:
- RoPE: HF Llama/Mixtral rotate the two halves of each head (``rotate_half``), as `arch.rope`
  does, and their on-disk q/k weights are already in that layout. Jamba has no RoPE.
- MLP: HF ``gate_proj``/``up_proj``/``down_proj`` (Mixtral ``w1``/``w3``/``w2``) are our SwiGLU
  ``w1``/``w3``/``w2``: ``w2(silu(w1 x) * w3 x)``.
- RMSNorm: one eps (``rms_norm_eps``) for every norm, weight applied after normalising.
- MoE router: fp32 softmax then top-k; Mixtral renormalises the top-k weights, Jamba does not.

Only config.json and *.safetensors are read or written, so this module does not import
transformers (safetensors and omegaconf are imported lazily). Anything HybridLM cannot express (biases, RoPE scaling, sliding windows, other
activations, ...) raises `HFInteropError` naming the config field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arch.config import ModelConfig
from arch.hf_jamba import MAMBA_KEYS
from arch.layouts import jamba_pattern
from arch.model import build_model
from arch.registry import UserError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "jamba": "JambaForCausalLM",
}
# config.json defaults of the fields we read, where the HF config classes have one.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_key_value_heads": None},
    "mixtral": {
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
    },
    "jamba": {
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
    },
}
_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_EXPERT = {"w1": "w1", "w3": "w3", "w2": "w2"}


class HFInteropError(UserError):
    """A Hugging Face model or a HybridLM that the other side cannot express."""


def _unsupported(field: str, value: Any, why: str) -> HFInteropError:
    return HFInteropError(f"Hugging Face config field '{field}' = {value!r}: {why}")


# ----------------------------------------------------------------------------------------------
# HF config.json -> ModelConfig


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    file = Path(hf_dir) / "config.json"
    if not file.exists():
        raise HFInteropError(
            f"{hf_dir} has no config.json; it is not a Hugging Face model directory"
        )
    return json.loads(file.read_text())


def hf_family(hf: Mapping[str, Any]) -> str:
    """'llama', 'mixtral' or 'jamba' from ``model_type``; an error for anything else."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _unsupported(
            "model_type", model_type, f"only {', '.join(ARCHITECTURES)} can be imported"
        )
    return model_type


def _get(hf: Mapping[str, Any], family: str, key: str) -> Any:
    if key in hf:
        return hf[key]
    if key in _DEFAULTS[family]:
        return _DEFAULTS[family][key]
    raise HFInteropError(f"Hugging Face config lacks the field '{key}' ({family})")


def _rope_theta(hf: Mapping[str, Any], family: str) -> float:
    """RoPE base; refuses any scaled / non-default RoPE (v4 `rope_scaling`, v5 `rope_parameters`)."""
    scaling = hf.get("rope_scaling")
    if scaling:
        rope_type = (
            scaling.get("rope_type", scaling.get("type"))
            if isinstance(scaling, Mapping)
            else scaling
        )
        if rope_type != "default":
            raise _unsupported("rope_scaling", scaling, "only the default (unscaled) RoPE")
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise _unsupported(
                "rope_parameters.rope_type", rope_type, "only the default (unscaled) RoPE"
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(_get(hf, family, "rope_theta"))


def _check_expressible(hf: Mapping[str, Any], family: str) -> None:
    falsy = {
        "attention_bias": "attention projections with a bias",
        "mlp_bias": "MLP projections with a bias",
        "mamba_proj_bias": "Mamba in_proj/out_proj with a bias",
        "sliding_window": "sliding-window attention",
        "router_jitter_noise": "router jitter noise",
    }
    for field, what in falsy.items():
        if hf.get(field):
            raise _unsupported(field, hf[field], f"HybridLM has no {what}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "only silu (SwiGLU) is supported")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        raise _unsupported(
            "head_dim", head_dim, "HybridLM's head_dim is hidden_size // num_attention_heads"
        )
    if family == "jamba" and hf.get("mamba_inner_layernorms") is False:
        raise _unsupported("mamba_inner_layernorms", False, "Jamba's dt/B/C norms are required")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig that reproduces a Llama, Mixtral or Jamba ``config.json`` dict."""
    family = hf_family(hf)
    _check_expressible(hf, family)
    layers = int(hf["num_hidden_layers"])
    if family == "llama":
        pattern = "*-" * layers
    elif family == "mixtral":
        pattern = "*E" * layers
    else:
        pattern = jamba_pattern(
            layers,
            *(
                int(_get(hf, family, k))
                for k in (
                    "attn_layer_period",
                    "attn_layer_offset",
                    "expert_layer_period",
                    "expert_layer_offset",
                )
            ),
        )
    vocab = int(hf["vocab_size"])
    n_heads = int(hf["num_attention_heads"])
    kv = _get(hf, family, "num_key_value_heads")
    cfg = ModelConfig(
        pattern=pattern,
        d_model=int(hf["hidden_size"]),
        n_heads=n_heads,
        n_kv_heads=n_heads if kv is None else int(kv),
        vocab_size=vocab,
        # Sharding-friendly padding when the vocabulary allows it; else padded == real.
        vocab_pad_multiple=128 if vocab % 128 == 0 else vocab,
        ffn_hidden=int(hf["intermediate_size"]),
        norm_eps=float(_get(hf, family, "rms_norm_eps")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    if family == "jamba":
        cfg.attention.rope = False
        m = cfg.mamba
        m.d_state = int(_get(hf, family, "mamba_d_state"))
        m.d_conv = int(_get(hf, family, "mamba_d_conv"))
        m.expand = int(_get(hf, family, "mamba_expand"))
        rank = _get(hf, family, "mamba_dt_rank")
        m.dt_rank = math.ceil(cfg.d_model / 16) if rank == "auto" else int(rank)
        m.dt_norms = True
        m.conv_bias = bool(_get(hf, family, "mamba_conv_bias"))
        num_experts = int(_get(hf, family, "num_experts"))
    else:
        cfg.attention.rope = True
        cfg.attention.rope_theta = _rope_theta(hf, family)
        num_experts = int(_get(hf, family, "num_local_experts")) if family == "mixtral" else 8
    if family != "llama":
        cfg.moe.num_experts = num_experts
        cfg.moe.top_k = int(_get(hf, family, "num_experts_per_tok"))
        cfg.moe.renormalize = family == "mixtral"
        cfg.moe.expert_hidden = cfg.ffn_hidden
        cfg.moe.aux_loss_weight = float(_get(hf, family, "router_aux_loss_coef"))
        cfg.moe.z_loss_weight = 0.0  # neither trains with one
    return cfg


# ----------------------------------------------------------------------------------------------
# ModelConfig -> HF config.json


def _fail(key: str, value: Any, why: str) -> HFInteropError:
    return HFInteropError(f"cannot export to Hugging Face: model.{key} = {value!r}: {why}")


def _period_offset(flags: list[bool], what: str) -> tuple[int, int]:
    """The smallest (period, offset) with flags[i] == (i % period == offset), as Jamba writes."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(f == (i % period == offset) for i, f in enumerate(flags)):
                return period, offset
    layout = "".join("x" if f else "." for f in flags)
    raise _fail("pattern", layout, f"the {what} layers do not follow Jamba's period/offset rule")


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of the HF model (Llama, Mixtral or Jamba) that equals ``cfg``."""
    table = cfg.symbol_table()
    symbols = cfg.layers
    for i, s in enumerate(symbols):
        plugin = table[s][1]
        expected = ("attention", "mamba") if i % 2 == 0 else ("mlp", "moe")
        if plugin not in expected:
            raise _fail(
                "pattern",
                cfg.pattern,
                f"sub-layer {i} is {plugin!r}; Hugging Face layers alternate a mixer "
                f"(attention or mamba) and an FFN (mlp or moe)",
            )
    if len(symbols) % 2:
        raise _fail("pattern", cfg.pattern, "an odd number of sub-layers (mixer + FFN pairs)")
    mixers = [table[s][1] for s in symbols[0::2]]
    ffns = [table[s][1] for s in symbols[1::2]]
    checks = [
        ("residual.name", cfg.residual.name, cfg.residual.name == "plain", "only 'plain'"),
        (
            "preconditioner.name",
            cfg.preconditioner.name,
            cfg.preconditioner.name == "none",
            "merge it first (hybridtron merge-pc)",
        ),
        ("ffn_activation", cfg.ffn_activation, cfg.ffn_activation == "swiglu", "only swiglu"),
        (
            "attention.name",
            cfg.attention.name,
            cfg.attention.name in ("sdpa", "eager"),
            "only full causal attention",
        ),
        ("attention.window", cfg.attention.window, cfg.attention.window is None, "must be null"),
    ]
    if "moe" in ffns:
        expert_hidden = cfg.moe.expert_hidden
        checks += [
            (
                "moe.capacity_factor",
                cfg.moe.capacity_factor,
                cfg.moe.capacity_factor is None,
                "HF MoE is dropless",
            ),
            (
                "moe.expert_hidden",
                expert_hidden,
                expert_hidden in (None, cfg.ffn_hidden_size),
                f"HF experts are as wide as the MLP ({cfg.ffn_hidden_size})",
            ),
        ]
    for key, value, ok, why in checks:
        if not ok:
            raise _fail(key, value, why)

    hf: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": len(mixers),
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": "float32",
    }
    if "mamba" in mixers:
        family = "jamba"
    elif "moe" in ffns:
        family = "mixtral"
        if "mlp" in ffns:
            raise _fail("pattern", cfg.pattern, "Mixtral needs every FFN to be MoE ('*E' * L)")
    else:
        family = "llama"
    if family == "jamba":
        if cfg.attention.rope:
            raise _fail("attention.rope", True, "Jamba has no RoPE")
        if not cfg.mamba.dt_norms:
            raise _fail("mamba.dt_norms", False, "Jamba's Mamba has dt/B/C norms")
        if cfg.moe.renormalize and "moe" in ffns:
            raise _fail("moe.renormalize", True, "Jamba's router does not renormalise")
        attn_period, attn_offset = _period_offset([m == "attention" for m in mixers], "attention")
        exp_period, exp_offset = _period_offset([f == "moe" for f in ffns], "MoE")
        hf.update(
            attn_layer_period=attn_period,
            attn_layer_offset=attn_offset,
            expert_layer_period=exp_period,
            expert_layer_offset=exp_offset,
            num_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_aux_loss_coef=cfg.moe.aux_loss_weight,
            mamba_d_state=cfg.mamba.d_state,
            mamba_d_conv=cfg.mamba.d_conv,
            mamba_expand=cfg.mamba.expand,
            mamba_dt_rank=cfg.mamba.rank(cfg.d_model),
            mamba_conv_bias=cfg.mamba.conv_bias,
            mamba_proj_bias=False,
        )
    else:
        if not cfg.attention.rope:
            raise _fail("attention.rope", False, f"{ARCHITECTURES[family]} always applies RoPE")
        theta = cfg.attention.rope_theta
        hf.update(
            rope_theta=theta,  # transformers 4.x
            rope_parameters={"rope_type": "default", "rope_theta": theta},  # 5.x
            attention_bias=False,
        )
        if family == "llama":
            hf["mlp_bias"] = False
        else:
            if not cfg.moe.renormalize:
                raise _fail("moe.renormalize", False, "Mixtral renormalises the top-k weights")
            hf.update(
                num_local_experts=cfg.moe.num_experts,
                num_experts_per_tok=cfg.moe.top_k,
                router_aux_loss_coef=cfg.moe.aux_loss_weight,
                sliding_window=None,
            )
    hf["model_type"] = family
    hf["architectures"] = [ARCHITECTURES[family]]
    return dict(sorted(hf.items()))


# ----------------------------------------------------------------------------------------------
# weights: one table of (our name, HF on-disk name) pairs serves both directions


def weight_pairs(cfg: ModelConfig, family: str) -> Iterator[tuple[str, str]]:
    """(our key, HF on-disk key) for every weight of ``cfg`` laid out as ``family``."""
    yield "embed.weight", "model.embed_tokens.weight"
    if not cfg.tie_embeddings:
        yield "head.weight", "lm_head.weight"
    yield (
        "norm.weight",
        "model.final_layernorm.weight" if family == "jamba" else "model.norm.weight",
    )
    ffn_norm = "pre_ff_layernorm" if family == "jamba" else "post_attention_layernorm"
    table = cfg.symbol_table()
    symbols = [table[s][1] for s in cfg.layers]  # plugin names: attention, mamba, mlp, moe
    for i in range(len(symbols) // 2):
        src, mixer, ffn = f"model.layers.{i}", f"layers.{2 * i}", f"layers.{2 * i + 1}"
        yield f"{mixer}.norm.weight", f"{src}.input_layernorm.weight"
        yield f"{ffn}.norm.weight", f"{src}.{ffn_norm}.weight"
        if symbols[2 * i] == "mamba":
            for key in MAMBA_KEYS:
                if key != "conv1d.bias" or cfg.mamba.conv_bias:
                    yield f"{mixer}.inner.{key}", f"{src}.mamba.{key}"
        else:
            for ours, theirs in _ATTENTION.items():
                yield f"{mixer}.inner.{ours}.weight", f"{src}.self_attn.{theirs}.weight"
        if family == "jamba":
            ff, experts, names = f"{src}.feed_forward", "experts", _MLP
            router = f"{ff}.router.weight"
        elif family == "mixtral":
            ff, experts, names = f"{src}.block_sparse_moe", "experts", _MIXTRAL_EXPERT
            router = f"{ff}.gate.weight"
        else:
            ff, names, router = f"{src}.mlp", _MLP, ""
        if symbols[2 * i + 1] == "mlp":
            for ours, theirs in _MLP.items():
                yield f"{ffn}.inner.{ours}.weight", f"{ff}.{theirs}.weight"
            continue
        yield f"{ffn}.inner.router.weight", router
        for e in range(cfg.moe.num_experts):
            for ours, theirs in names.items():
                yield (
                    f"{ffn}.inner.experts.{e}.{ours}.weight",
                    f"{ff}.{experts}.{e}.{theirs}.weight",
                )


def _unfuse(hf_state: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """transformers 5.x in-memory names (fused experts, Mixtral's ``mlp.``) -> on-disk names."""
    gate_up, down = ("gate_proj", "up_proj"), "down_proj"
    if family == "mixtral":
        gate_up, down = ("w1", "w3"), "w2"
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        if family == "mixtral" and ".mlp." in key:
            key = key.replace(".mlp.", ".block_sparse_moe.")
        if key.endswith(".experts.gate_up_proj"):
            base = key.removesuffix("gate_up_proj")
            for e, w in enumerate(value):
                g, u = w.chunk(2, dim=0)
                out[f"{base}{e}.{gate_up[0]}.weight"], out[f"{base}{e}.{gate_up[1]}.weight"] = g, u
        elif key.endswith(".experts.down_proj"):
            base = key.removesuffix("down_proj")
            for e, w in enumerate(value):
                out[f"{base}{e}.{down}.weight"] = w
        elif not key.endswith("rotary_emb.inv_freq"):
            out[key] = value
    return out


def state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig, family: str
) -> dict[str, torch.Tensor]:
    """Our state dict from an HF one (on-disk or transformers in-memory names); vocab rows are
    zero-padded to ``cfg.padded_vocab_size``. Unused or missing HF weights are an error."""
    sd = _unfuse(hf_state, family)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in weight_pairs(cfg, family):
        if theirs not in sd:
            raise HFInteropError(f"Hugging Face weights lack {theirs!r} (needed for {ours})")
        w = sd.pop(theirs)
        if ours in ("embed.weight", "head.weight") and w.shape[0] != cfg.padded_vocab_size:
            padded = w.new_zeros(cfg.padded_vocab_size, w.shape[1])
            padded[: w.shape[0]] = w
            w = padded
        out[ours] = w
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # in memory a tied head is listed too
    if sd:
        raise HFInteropError(
            f"Hugging Face weights not mapped (an unsupported option?): {sorted(sd)[:5]}"
        )
    return out


def state_dict_to_hf(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, family: str
) -> dict[str, torch.Tensor]:
    """The HF on-disk state dict of our ``state`` (vocab padding rows dropped)."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in weight_pairs(cfg, family):
        w = state[ours]
        if ours in ("embed.weight", "head.weight"):
            w = w[: cfg.vocab_size]
        out[theirs] = w.detach().contiguous().clone()
    return out


# ----------------------------------------------------------------------------------------------
# directories


def load_hf_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's ``*.safetensors`` files (single or sharded)."""
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise HFInteropError(
            f"{hf_dir} has no *.safetensors weights (PyTorch .bin files are not read; "
            f"re-save the model with safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def import_hf_dir(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state dict) of a local HF Llama / Mixtral / Jamba directory."""
    hf = read_hf_config(hf_dir)
    cfg = config_from_hf(hf)
    return cfg, state_dict_from_hf(load_hf_state(hf_dir), cfg, hf_family(hf))


def export_hf_dir(cfg: ModelConfig, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers' from_pretrained loads."""
    from safetensors.torch import save_file

    hf = hf_config_from(cfg)
    tensors = state_dict_to_hf(state, cfg, hf["model_type"])
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        hf["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out


def _hybridtron_step_dir(path: Path) -> Path | None:
    """The checkpoint directory holding model.safetensors + config.yaml under ``path``."""
    if (path / "config.yaml").exists() and (
        (path / "model.safetensors").exists() or any(path.glob("shard-pp*-tp*.safetensors"))
    ):
        return path
    for checkpoints in (path, path / "checkpoints"):
        latest = checkpoints / "latest"
        steps = sorted(p for p in checkpoints.glob("step_*") if p.is_dir() and "." not in p.name)
        if steps:  # the newest directory wins over the pointer, as the trainer resumes
            return steps[-1]
        if latest.exists():
            return checkpoints / latest.read_text().strip()
    return None


def model_config_from_yaml(file: str | Path) -> ModelConfig:
    """The ``model`` section of a run's / checkpoint's config.yaml as a ModelConfig."""
    from omegaconf import OmegaConf

    stored = OmegaConf.load(file)
    section = stored.get("model", {})
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), section))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """An eval-mode model from a hybridtron checkpoint / run directory or a HF directory
    (Llama, Mixtral, Jamba); ``model(input_ids)`` returns logits [B, T, vocab]."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    step_dir = _hybridtron_step_dir(path)
    if step_dir is not None:
        # The trainer's reader merges the shards of a multi-process checkpoint (any layout).
        from trainer.checkpoint import verify_checkpoint

        cfg = model_config_from_yaml(step_dir / "config.yaml")
        state = verify_checkpoint(step_dir).model_state()
    elif (path / "config.json").exists():
        cfg, state = import_hf_dir(path)
    else:
        raise UserError(
            f"{path} is neither a hybridtron checkpoint / run directory nor a Hugging Face "
            f"model directory (config.json + *.safetensors)"
        )
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    return model.eval()
