"""The model's config: typed dataclasses that OmegaConf turns into a structured config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from arch.registry import ConfigError

# Pattern symbols and the (registry kind, default plugin) they stand for. The table is open:
# `model.symbols` adds or re-points symbols (e.g. {"A": "my_mixer"}) without touching code.
DEFAULT_SYMBOLS: dict[str, tuple[str, str]] = {
    "*": ("mixer", "attention"),
    "-": ("ffn", "mlp"),
    "M": ("mixer", "mamba"),
    "S": ("mixer", "mamba2"),
    "E": ("ffn", "moe"),
}
STAGE_SEPARATOR = "|"


@dataclass
class AttentionConfig:
    name: str = "sdpa"  # attention implementation (registry `attention`)
    rope: bool = True  # rotary position embedding on q and k (Llama: on, Jamba: off)
    rope_theta: float = 10000.0
    window: int | None = None  # sliding-window size in tokens (implementations that use it)
    block_size: int = 64  # block_sparse: tokens per block (own block attended causally)
    stride: int = 4  # block_sparse: also attend earlier blocks j with (i - j) % stride == 0


@dataclass
class ResidualConfig:
    name: str = (
        "plain"  # how a sub-layer's output updates the residual stream (registry `residual`)
    )
    options: dict[str, Any] = field(default_factory=dict)  # plugin-specific settings


@dataclass
class PreconditionerConfig:
    name: str = "none"  # weight re-parameterisation (registry `preconditioner`)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MambaConfig:
    """The Mamba-1 mixer (`M`), as in Jamba: selective scan with RMSNorms on dt, B and C."""

    d_state: int = 16  # N: SSM state size per channel
    d_conv: int = 4  # causal depthwise conv width
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int | None = None  # rank of the dt projection; None: ceil(d_model / 16)
    dt_norms: bool = True  # Jamba's RMSNorms on dt/B/C after x_proj; false = vanilla Mamba-1
    conv_bias: bool = True
    scan: str = "auto"  # auto | cpu | chunked | loop | cuda (see arch.selective_scan)
    # The `chunked` scan's in-chunk strategy: auto (parallel on CUDA, sequential on CPU) |
    # sequential | parallel (see arch.selective_scan_chunked).
    chunked_strategy: str = "auto"

    def rank(self, d_model: int) -> int:
        """The dt projection's rank (Mamba's "auto" rule when dt_rank is None)."""
        return -(-d_model // 16) if self.dt_rank is None else self.dt_rank


@dataclass
class Mamba2Config:
    """The Mamba-2 mixer (`S`): SSD with a scalar decay per head, chunked matmul form."""

    d_state: int = 64  # N: state size per head (shared by the heads of a B/C group)
    head_dim: int = 32  # P: channels per head; heads = expand * d_model / head_dim
    expand: int = 2  # d_inner = expand * d_model
    n_groups: int = 1  # B/C groups (heads per group share B and C); divides the heads
    chunk_size: int = 64  # Q of the chunked SSD (any sequence length works)
    d_conv: int = 4  # causal depthwise conv width over x, B and C


@dataclass
class MoEConfig:
    """The mixture-of-experts FFN (`E`): softmax router, top-k, SwiGLU experts."""

    num_experts: int = 8
    top_k: int = 2
    renormalize: bool = False  # renormalise the top-k weights to sum 1 (Mixtral); Jamba: false
    expert_hidden: int | None = None  # each expert's SwiGLU width; None: model.ffn_hidden_size
    capacity_factor: float | None = None  # None: dropless; else C = ceil(k T / E * factor)
    aux_loss_weight: float = 0.01  # load-balancing loss, HF convention (balanced value = top_k)
    z_loss_weight: float = 0.001  # router z-loss, mean logsumexp(logits)^2


@dataclass
class ModelConfig:
    pattern: str = "*-*-*-*-"  # one symbol per residual sub-layer; `|` between pipeline stages
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads
    vocab_size: int = 257  # the tokenizer's real vocabulary
    vocab_pad_multiple: int = 128  # embedding rows padded so any TP size divides them
    ffn_hidden: int | None = None  # None: 8/3 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    ffn_activation: str = "swiglu"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    symbols: dict[str, str] = field(default_factory=dict)  # extra / re-pointed pattern symbols
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    preconditioner: PreconditionerConfig = field(default_factory=PreconditionerConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    moe: MoEConfig = field(default_factory=MoEConfig)

    # Derived values (never stored in the config, always computed the same way).
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    @property
    def ffn_hidden_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        m = self.ffn_multiple_of
        return -(-hidden // m) * m

    @property
    def layers(self) -> list[str]:
        """The pattern's symbols without stage separators."""
        return [s for s in self.pattern if s != STAGE_SEPARATOR]

    def symbol_table(self) -> dict[str, tuple[str, str]]:
        table = dict(DEFAULT_SYMBOLS)
        for symbol, plugin in self.symbols.items():
            kind = table[symbol][0] if symbol in table else _kind_of_plugin(plugin)
            table[symbol] = (kind, plugin)
        return table


def _kind_of_plugin(plugin: str) -> str:
    from arch.layers_registry import FFNS, MIXERS  # late: the registries import this module

    if plugin in MIXERS:
        return "mixer"
    if plugin in FFNS:
        return "ffn"
    raise ConfigError(
        "model.symbols",
        f"{plugin!r} is neither a registered mixer nor ffn "
        f"(mixers: {', '.join(MIXERS.names())}; ffns: {', '.join(FFNS.names())})",
    )


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot build a model."""
    for key in (
        "d_model",
        "n_heads",
        "vocab_size",
        "vocab_pad_multiple",
        "ffn_multiple_of",
        "norm_eps",
        "init_std",
    ):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"model.{key}", f"must be positive, got {getattr(cfg, key)}")
    for key in ("n_kv_heads", "ffn_hidden"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"model.{key}", f"must be positive or null (derived), got {value}")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(
            "model.n_heads", f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}"
        )
    if cfg.n_heads % cfg.kv_heads:
        raise ConfigError(
            "model.n_kv_heads",
            f"n_heads={cfg.n_heads} must be a multiple of n_kv_heads={cfg.n_kv_heads}",
        )
    if cfg.attention.rope and cfg.head_dim % 2:
        raise ConfigError(
            "model.attention.rope", f"RoPE needs an even head_dim, got {cfg.head_dim}"
        )
    if not cfg.layers:
        raise ConfigError("model.pattern", "is empty; give at least one symbol, e.g. '*-'")
    from arch.layers_registry import FFNS, MIXERS  # late: the registries import this module

    table = cfg.symbol_table()
    for i, symbol in enumerate(cfg.pattern):
        if symbol == STAGE_SEPARATOR:
            continue
        if symbol not in table:
            raise ConfigError(
                "model.pattern",
                f"unknown symbol {symbol!r} at position {i}; known: {''.join(sorted(table))} "
                f"(add one with model.symbols)",
            )
        kind, plugin = table[symbol]
        registry = MIXERS if kind == "mixer" else FFNS
        if plugin not in registry:
            raise ConfigError(
                "model.pattern",
                f"symbol {symbol!r} stands for the {kind} {plugin!r}, which is not registered "
                f"(registered {kind}s: {', '.join(registry.names())}); re-point it with "
                f"model.symbols or install the plugin",
            )
    stages = cfg.pattern.split(STAGE_SEPARATOR)
    if any(not stage for stage in stages):
        raise ConfigError("model.pattern", f"{cfg.pattern!r} has an empty pipeline stage")
    _validate_plugin_options(cfg)
    _validate_mamba(cfg.mamba)
    _validate_mamba2(cfg)
    _validate_attention_variants(cfg)
    _validate_ffn_activation(cfg)
    _validate_moe(cfg.moe)


MAMBA_SCANS = ("auto", "cpu", "chunked", "loop", "cuda")
CHUNKED_STRATEGIES = ("auto", "sequential", "parallel")


def _validate_mamba(m: MambaConfig) -> None:
    for key in ("d_state", "d_conv", "expand"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.mamba.{key}", f"must be positive, got {getattr(m, key)}")
    if m.dt_rank is not None and m.dt_rank <= 0:
        raise ConfigError(
            "model.mamba.dt_rank", f"must be positive or null (ceil(d_model/16)), got {m.dt_rank}"
        )
    if m.scan not in MAMBA_SCANS:
        raise ConfigError(
            "model.mamba.scan", f"must be one of {'|'.join(MAMBA_SCANS)}, got {m.scan!r}"
        )
    if m.chunked_strategy not in CHUNKED_STRATEGIES:
        raise ConfigError(
            "model.mamba.chunked_strategy",
            f"must be one of {'|'.join(CHUNKED_STRATEGIES)}, got {m.chunked_strategy!r}",
        )


def _validate_mamba2(cfg: ModelConfig) -> None:
    m = cfg.mamba2
    for key in ("d_state", "head_dim", "expand", "n_groups", "chunk_size", "d_conv"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.mamba2.{key}", f"must be positive, got {getattr(m, key)}")
    table = cfg.symbol_table()
    if "mamba2" not in {table[symbol][1] for symbol in cfg.layers}:
        return  # the shape rules below only bind models that build a Mamba-2 mixer
    d_inner = m.expand * cfg.d_model
    if d_inner % m.head_dim:
        raise ConfigError(
            "model.mamba2.head_dim",
            f"must divide expand * d_model = {d_inner}, got {m.head_dim}",
        )
    if (d_inner // m.head_dim) % m.n_groups:
        raise ConfigError(
            "model.mamba2.n_groups",
            f"must divide the number of heads {d_inner // m.head_dim}, got {m.n_groups}",
        )


def _validate_attention_variants(cfg: ModelConfig) -> None:
    a = cfg.attention
    if a.window is not None and a.window <= 0:
        raise ConfigError("model.attention.window", f"must be positive or null, got {a.window}")
    if a.name == "sliding_window" and a.window is None:
        raise ConfigError("model.attention.window", "sliding_window attention needs a window")
    for key in ("block_size", "stride"):
        if getattr(a, key) <= 0:
            raise ConfigError(f"model.attention.{key}", f"must be positive, got {getattr(a, key)}")


def _validate_ffn_activation(cfg: ModelConfig) -> None:
    from arch.layers_registry import ACTIVATIONS  # late: the registries import this module

    if cfg.ffn_activation not in ACTIVATIONS:
        raise ConfigError(
            "model.ffn_activation",
            f"unknown activation {cfg.ffn_activation!r}; choose one of: "
            f"{', '.join(ACTIVATIONS.names())}",
        )


def _validate_moe(m: MoEConfig) -> None:
    if m.num_experts <= 0:
        raise ConfigError("model.moe.num_experts", f"must be positive, got {m.num_experts}")
    if not 0 < m.top_k <= m.num_experts:
        raise ConfigError(
            "model.moe.top_k", f"must be in [1, num_experts={m.num_experts}], got {m.top_k}"
        )
    if m.expert_hidden is not None and m.expert_hidden <= 0:
        raise ConfigError(
            "model.moe.expert_hidden",
            f"must be positive or null (model.ffn_hidden_size), got {m.expert_hidden}",
        )
    if m.capacity_factor is not None and m.capacity_factor <= 0:
        raise ConfigError(
            "model.moe.capacity_factor",
            f"must be positive or null (dropless), got {m.capacity_factor}",
        )
    for key in ("aux_loss_weight", "z_loss_weight"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.moe.{key}", f"must be >= 0, got {getattr(m, key)}")


def _validate_plugin_options(cfg: ModelConfig) -> None:
    """model.residual.options / model.preconditioner.options against what the plugin declares."""
    from arch.layers_registry import PRECONDITIONERS, RESIDUALS  # late, as above
    from arch.options import resolve_options

    for key, section, registry in (
        ("model.residual", cfg.residual, RESIDUALS),
        ("model.preconditioner", cfg.preconditioner, PRECONDITIONERS),
    ):
        if section.name in registry:  # an unknown name is reported by its own check
            resolve_options(
                registry.get(section.name), section.options, f"{key}.options", section.name
            )
