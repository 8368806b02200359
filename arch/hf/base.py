"""The adapter base of a Hugging Face family, and the shared config.json / safetensors I/O.

An adapter (one file per family, torchtitan's ``StateDictAdapter`` is the model) says how one
HF family maps to a HybridLM in both directions: config (`config_from_hf` / `config_to_hf`) and
weights (`from_hf` / `to_hf`, both driven by one table of name pairs, `weight_pairs`).

An HF decoder layer i becomes two sub-layers of our pattern: 2i = its mixer (`*` attention or
`M` Mamba) with the layer's first RMSNorm as pre-norm, 2i+1 = its FFN (`-` SwiGLU MLP or `E`
MoE) with the second. Semantics that line up without any weight permutation, shared by the
families here:
- RoPE: HF rotates the two halves of each head (``rotate_half``), as `arch.rope` does, and the
  on-disk q/k weights are already in that layout.
- MLP: HF ``gate_proj``/``up_proj``/``down_proj`` are our SwiGLU ``w1``/``w3``/``w2``:
  ``w2(silu(w1 x) * w3 x)``.
- RMSNorm: one eps (``rms_norm_eps``) for every norm, weight applied after normalising.
- MoE router: fp32 softmax then top-k (whether the top-k weights are renormalised is the
  family's choice).

Only config.json and *.safetensors are read or written, so nothing here imports transformers.
Anything HybridLM cannot express (biases, RoPE scaling, sliding windows, other activations, ...)
raises `HFInteropError` naming the config field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from arch.config import ModelConfig
from arch.registry import UserError

ATTENTION_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
MLP_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
WeightPairs = Iterator[tuple[str, str]]  # (our key, HF on-disk key)

# model_type -> adapter; each family file adds itself with `@register_family`.
FAMILIES: dict[str, HFAdapter] = {}


class HFInteropError(UserError):
    """A Hugging Face model or a HybridLM that the other side cannot express."""


def unsupported(field: str, value: Any, why: str) -> HFInteropError:
    return HFInteropError(f"Hugging Face config field '{field}' = {value!r}: {why}")


def cannot_export(key: str, value: Any, why: str) -> HFInteropError:
    return HFInteropError(f"cannot export to Hugging Face: model.{key} = {value!r}: {why}")


def register_family(adapter: type[HFAdapter]) -> type[HFAdapter]:
    """Class decorator: make ``adapter`` the one for its ``model_type``."""
    FAMILIES[adapter.model_type] = adapter()
    return adapter


class HFAdapter:
    """How one Hugging Face family maps to a HybridLM; subclasses fill in the family's parts."""

    model_type: ClassVar[str]  # config.json "model_type"
    architecture: ClassVar[str]  # config.json "architectures"[0], the transformers class
    defaults: ClassVar[dict[str, Any]] = {}  # config.json defaults of the fields read
    final_norm: ClassVar[str] = "model.norm.weight"
    ffn_norm: ClassVar[str] = "post_attention_layernorm"  # the layer's second RMSNorm

    # ---- config.json -> ModelConfig ------------------------------------------------------
    def get(self, hf: Mapping[str, Any], key: str) -> Any:
        """A config.json field, or the HF config class's default for it."""
        if key in hf:
            return hf[key]
        if key in self.defaults:
            return self.defaults[key]
        raise HFInteropError(f"Hugging Face config lacks the field '{key}' ({self.model_type})")

    def config_from_hf(self, hf: Mapping[str, Any]) -> ModelConfig:
        """The ModelConfig that reproduces this family's ``config.json`` dict."""
        self.check_expressible(hf)
        vocab = int(hf["vocab_size"])
        n_heads = int(hf["num_attention_heads"])
        kv = self.get(hf, "num_key_value_heads")
        cfg = ModelConfig(
            pattern=self.pattern(hf, int(hf["num_hidden_layers"])),
            d_model=int(hf["hidden_size"]),
            n_heads=n_heads,
            n_kv_heads=n_heads if kv is None else int(kv),
            vocab_size=vocab,
            # Sharding-friendly padding when the vocabulary allows it; else padded == real.
            vocab_pad_multiple=128 if vocab % 128 == 0 else vocab,
            ffn_hidden=int(hf["intermediate_size"]),
            norm_eps=float(self.get(hf, "rms_norm_eps")),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
        self.configure(cfg, hf)
        return cfg

    def check_expressible(self, hf: Mapping[str, Any]) -> None:
        """Refuse what HybridLM cannot express, naming the field (families add their own)."""
        absent = {
            "attention_bias": "attention projections with a bias",
            "mlp_bias": "MLP projections with a bias",
            "sliding_window": "sliding-window attention",
            "router_jitter_noise": "router jitter noise",
        }
        for field, what in absent.items():
            if hf.get(field):
                raise unsupported(field, hf[field], f"HybridLM has no {what}")
        if hf.get("hidden_act", "silu") != "silu":
            raise unsupported("hidden_act", hf["hidden_act"], "only silu (SwiGLU) is supported")
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
            raise unsupported(
                "head_dim", head_dim, "HybridLM's head_dim is hidden_size // num_attention_heads"
            )

    def pattern(self, hf: Mapping[str, Any], layers: int) -> str:
        """Our pattern string for ``layers`` HF decoder layers."""
        raise NotImplementedError

    def configure(self, cfg: ModelConfig, hf: Mapping[str, Any]) -> None:
        """Set the family's semantics on ``cfg`` (RoPE, Mamba, MoE...)."""
        raise NotImplementedError

    def configure_moe(self, cfg: ModelConfig, hf: Mapping[str, Any], num_experts: int) -> None:
        cfg.moe.num_experts = num_experts
        cfg.moe.top_k = int(self.get(hf, "num_experts_per_tok"))
        cfg.moe.expert_hidden = cfg.ffn_hidden
        cfg.moe.aux_loss_weight = float(self.get(hf, "router_aux_loss_coef"))
        cfg.moe.z_loss_weight = 0.0  # the HF families train without one

    # ---- ModelConfig -> config.json ------------------------------------------------------
    def exports(self, mixers: list[str], ffns: list[str]) -> bool:
        """Whether a model of these mixer / FFN plugin names is exported as this family."""
        raise NotImplementedError

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """The ``config.json`` of the HF model of this family that equals ``cfg``."""
        mixers, ffns = split_layers(cfg)
        check_exportable(cfg, ffns)
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
        hf.update(self.family_fields(cfg, mixers, ffns))
        hf["model_type"] = self.model_type
        hf["architectures"] = [self.architecture]
        return dict(sorted(hf.items()))

    def family_fields(self, cfg: ModelConfig, mixers: list[str], ffns: list[str]) -> dict:
        """The family's own config.json fields for ``cfg`` (refusing what it cannot hold)."""
        raise NotImplementedError

    # ---- weights ---------------------------------------------------------------------------
    def weight_pairs(self, cfg: ModelConfig) -> WeightPairs:
        """(our key, HF on-disk key) for every weight of ``cfg``: one table, both directions."""
        yield "embed.weight", "model.embed_tokens.weight"
        if not cfg.tie_embeddings:
            yield "head.weight", "lm_head.weight"
        yield "norm.weight", self.final_norm
        mixers, ffns = split_layers(cfg, check=False)
        for i, (mixer, ffn) in enumerate(zip(mixers, ffns, strict=True)):
            src, ours_mixer, ours_ffn = (
                f"model.layers.{i}",
                f"layers.{2 * i}",
                f"layers.{2 * i + 1}",
            )
            yield f"{ours_mixer}.norm.weight", f"{src}.input_layernorm.weight"
            yield f"{ours_ffn}.norm.weight", f"{src}.{self.ffn_norm}.weight"
            yield from self.mixer_pairs(mixer, f"{ours_mixer}.inner", src, cfg)
            yield from self.ffn_pairs(ffn, f"{ours_ffn}.inner", src, cfg)

    def mixer_pairs(self, plugin: str, ours: str, src: str, cfg: ModelConfig) -> WeightPairs:
        if plugin != "attention":
            raise HFInteropError(f"{self.architecture} has no {plugin!r} mixer")
        for mine, theirs in ATTENTION_NAMES.items():
            yield f"{ours}.{mine}.weight", f"{src}.self_attn.{theirs}.weight"

    def ffn_pairs(self, plugin: str, ours: str, src: str, cfg: ModelConfig) -> WeightPairs:
        if plugin != "mlp":
            raise HFInteropError(f"{self.architecture} has no {plugin!r} FFN")
        yield from mlp_pairs(ours, f"{src}.mlp", MLP_NAMES)

    def on_disk_names(self, hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict under on-disk names, from on-disk or transformers in-memory names
        (families that fuse or rename weights in memory override this)."""
        return {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}

    def from_hf(
        self, hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig
    ) -> dict[str, torch.Tensor]:
        """Our state dict from an HF one (on-disk or in-memory names); vocab rows are
        zero-padded to ``cfg.padded_vocab_size``. Unused or missing HF weights are an error."""
        sd = self.on_disk_names(hf_state)
        out: dict[str, torch.Tensor] = {}
        for ours, theirs in self.weight_pairs(cfg):
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

    def to_hf(self, state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """The HF on-disk state dict of our ``state`` (vocab padding rows dropped)."""
        out: dict[str, torch.Tensor] = {}
        for ours, theirs in self.weight_pairs(cfg):
            w = state[ours]
            if ours in ("embed.weight", "head.weight"):
                w = w[: cfg.vocab_size]
            out[theirs] = w.detach().contiguous().clone()
        return out


# ---- helpers the families share ------------------------------------------------------------
def split_layers(cfg: ModelConfig, check: bool = True) -> tuple[list[str], list[str]]:
    """The plugin names of the (mixer, FFN) sub-layer pairs HF layers are made of."""
    table = cfg.symbol_table()
    plugins = [table[s][1] for s in cfg.layers]
    if check:
        for i, plugin in enumerate(plugins):
            expected = ("attention", "mamba") if i % 2 == 0 else ("mlp", "moe")
            if plugin not in expected:
                raise cannot_export(
                    "pattern",
                    cfg.pattern,
                    f"sub-layer {i} is {plugin!r}; Hugging Face layers alternate a mixer "
                    f"(attention or mamba) and an FFN (mlp or moe)",
                )
        if len(plugins) % 2:
            raise cannot_export(
                "pattern", cfg.pattern, "an odd number of sub-layers (mixer + FFN pairs)"
            )
    return plugins[0::2], plugins[1::2]


def check_exportable(cfg: ModelConfig, ffns: list[str]) -> None:
    """What no HF family here can hold: non-plain residuals, PC layers, other attention..."""
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
            raise cannot_export(key, value, why)


def rope_theta(adapter: HFAdapter, hf: Mapping[str, Any]) -> float:
    """RoPE base; refuses any scaled / non-default RoPE (v4 `rope_scaling`, v5 `rope_parameters`)."""
    scaling = hf.get("rope_scaling")
    if scaling:
        rope_type = (
            scaling.get("rope_type", scaling.get("type"))
            if isinstance(scaling, Mapping)
            else scaling
        )
        if rope_type != "default":
            raise unsupported("rope_scaling", scaling, "only the default (unscaled) RoPE")
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise unsupported(
                "rope_parameters.rope_type", rope_type, "only the default (unscaled) RoPE"
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(adapter.get(hf, "rope_theta"))


def rope_fields(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    """config.json RoPE fields of a family that always applies (unscaled) RoPE."""
    if not cfg.attention.rope:
        raise cannot_export("attention.rope", False, f"{architecture} always applies RoPE")
    theta = cfg.attention.rope_theta
    return {
        "rope_theta": theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # 5.x
        "attention_bias": False,
    }


def mlp_pairs(ours: str, theirs: str, names: Mapping[str, str]) -> WeightPairs:
    for mine, hf_name in names.items():
        yield f"{ours}.{mine}.weight", f"{theirs}.{hf_name}.weight"


def moe_pairs(
    ours: str, prefix: str, router: str, names: Mapping[str, str], cfg: ModelConfig
) -> WeightPairs:
    """Router and per-expert SwiGLU weights of an MoE block at HF ``prefix``."""
    yield f"{ours}.router.weight", f"{prefix}.{router}.weight"
    for e in range(cfg.moe.num_experts):
        yield from mlp_pairs(f"{ours}.experts.{e}", f"{prefix}.experts.{e}", names)


def unfuse_experts(
    hf_state: Mapping[str, torch.Tensor],
    gate_up: tuple[str, str],
    down: str,
    rename: Callable[[str], str] = lambda key: key,
) -> dict[str, torch.Tensor]:
    """transformers 5.x in-memory fused experts (``experts.gate_up_proj [E, 2I, H]``,
    ``experts.down_proj [E, H, I]``) -> the on-disk per-expert names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        key = rename(key)
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


# ---- directories -----------------------------------------------------------------------------
def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    file = Path(hf_dir) / "config.json"
    if not file.exists():
        raise HFInteropError(
            f"{hf_dir} has no config.json; it is not a Hugging Face model directory"
        )
    return json.loads(file.read_text())


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


def write_hf_dir(hf: dict[str, Any], tensors: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers' from_pretrained loads."""
    from safetensors.torch import save_file

    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        hf["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out
