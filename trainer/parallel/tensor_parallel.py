"""Megatron-style tensor parallelism (TP) for a built dense `HybridLM`, applied in place.

The model code in `arch` stays single-device. `apply_tensor_parallel` takes the dense model that
every TP rank built from the same seed and swaps projections, convolutions and per-channel
parameters for this rank's shards (torchtitan's ``parallelize`` style). Parameter names stay the
dense model's, only shapes shrink; `split_for_rank` / `merge_shards` map between the two, so a
checkpoint written at one TP size loads at any other.

What is split (tp ranks of Megatron's TP group, `megatron.core.parallel_state`):

- embedding: vocab-parallel over the padded vocabulary rows (`VocabParallelEmbedding`); an untied
  head column-parallel over the same rows, a tied one reuses the embedding shard; logits of the
  padding rows are -inf, so `parallel_cross_entropy` (`vocab_parallel_cross_entropy`) equals the
  dense `lm_loss` over the real vocabulary;
- attention: wq, wk, wv column-parallel by (kv) heads, wo row-parallel; kernels are per head;
- MLP: w1, w3 column, w2 row; MoE: router replicated, every expert an MLP split the same way
  (its output is reduced before the router weight multiplies it, so router grads are exact);
- Mamba-1: in_proj column over both halves [x; z], depthwise conv1d, dt_proj (weight rows and
  bias), A_log and D by channel, x_proj and out_proj row; dt, B and C (full after x_proj's
  reduction and the replicated RMSNorms) enter the channel-split scan through
  `copy_to_tp_region` so their gradients are summed over the TP group;
- Mamba-2: by heads and B/C groups: in_proj's [z, x, B, C, dt] parts, conv1d over [x, B, C],
  dt_bias, A_log, D, the gated norm's weight (its groups divided), out_proj row;
- PC preconditioner (`arch.pc_layer.PCLinear`): the wrapped weight is all-gathered, W_eff is
  computed in full on every rank and each rank multiplies by its own slice (see `TPPCLinear`);
- norms, residual plugins, the router, gamma and PC's u, v: replicated.

Sharded parameters carry Megatron's ``tensor_model_parallel`` / ``partition_dim`` /
``partition_stride`` attributes (grad-norm and clipping count them on every rank, replicated ones
once); replicated parameters do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)
from torch import nn

from arch.config import ModelConfig
from arch.model import HybridLM, lm_loss
from arch.numerics import fp32_or_wider
from arch.pc_layer import PCLinear, pc_polynomial, power_iteration
from arch.registry import ConfigError

# Plugins with a TP recipe here (others cannot be split and are refused by check_tensor_parallel).
TP_MIXERS = ("attention", "mamba", "mamba2")
TP_FFNS = ("mlp", "moe")


# --------------------------------------------------------------------------------------------
# Layouts: how each dense parameter is cut (pure functions of the name and the config)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A split along ``dim``; a fused tensor lists its ``parts`` (sizes along dim), each cut evenly
    into ``size`` pieces, and a shard is its piece of every part, in order."""

    dim: int
    parts: tuple[int, ...] | None = None  # None: one part (the whole dim)

    @property
    def stride(self) -> int:
        return 1 if self.parts is None else len(self.parts)


ROW, COL = Layout(0), Layout(1)  # rows: column-parallel weight; columns: row-parallel weight


def _plugin(cfg: ModelConfig, layer: int) -> str:
    return cfg.symbol_table()[cfg.layers[layer]][1]


def _layout(name: str, cfg: ModelConfig) -> Layout | None:
    """How dense parameter/buffer ``name`` is split under TP, or None when it is replicated."""
    if name in ("embed.weight", "head.weight"):
        return ROW
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "layers" or parts[2] != "inner":
        return None  # norms, residual plugins, state_init
    if parts[-2] == "lin":  # a PC-wrapped projection: the raw weight is split like a plain one
        parts = parts[:-2] + parts[-1:]  # (its gamma, u, v match no entry below: replicated)
    key, leaf = ".".join(parts[3:-1]), parts[-1]
    plugin = _plugin(cfg, int(parts[1]))
    if plugin == "attention":
        return {"wq": ROW, "wk": ROW, "wv": ROW, "wo": COL}.get(key) if leaf == "weight" else None
    if plugin in ("mlp", "moe"):
        if plugin == "moe":
            if not key.startswith("experts."):
                return None  # the router
            key = key.split(".", 2)[2]
        return {"w1": ROW, "w3": ROW, "w2": COL}.get(key) if leaf == "weight" else None
    if plugin == "mamba":
        d = cfg.mamba.expand * cfg.d_model
        table = {
            "in_proj.weight": Layout(0, (d, d)),  # rows [x; z]
            "conv1d.weight": ROW,
            "conv1d.bias": ROW,
            "x_proj.weight": COL,
            "dt_proj.weight": ROW,
            "dt_proj.bias": ROW,
            "A_log": ROW,
            "D": ROW,
            "out_proj.weight": COL,
        }
        return table.get(f"{key}.{leaf}" if key else leaf)
    if plugin == "mamba2":
        m = cfg.mamba2
        d = m.expand * cfg.d_model
        gn, heads = m.n_groups * m.d_state, d // m.head_dim
        table = {
            "in_proj.weight": Layout(0, (d, d, gn, gn, heads)),  # rows [z, x, B, C, dt]
            "conv1d.weight": Layout(0, (d, gn, gn)),  # channels [x, B, C]
            "conv1d.bias": Layout(0, (d, gn, gn)),
            "dt_bias": ROW,
            "A_log": ROW,
            "D": ROW,
            "norm.weight": ROW,
            "out_proj.weight": COL,
        }
        return table.get(f"{key}.{leaf}" if key else leaf)
    return None


def _split(full: torch.Tensor, layout: Layout, rank: int, size: int) -> torch.Tensor:
    pieces = [full] if layout.parts is None else full.split(list(layout.parts), layout.dim)
    out = []
    for piece in pieces:
        n = piece.shape[layout.dim]
        if n % size:
            raise ValueError(f"dim {layout.dim} of size {n} does not split into {size} shards")
        out.append(piece.narrow(layout.dim, rank * (n // size), n // size))
    return torch.cat(out, layout.dim)


def _merge(shards: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    size = len(shards)
    if layout.parts is None:
        return torch.cat(shards, layout.dim)
    local = [p // size for p in layout.parts]
    pieces = [s.split(local, layout.dim) for s in shards]
    return torch.cat(
        [torch.cat([p[i] for p in pieces], layout.dim) for i in range(len(local))], layout.dim
    )


def is_tensor_parallel_param(name: str, cfg: ModelConfig) -> bool:
    """Whether dense parameter ``name`` is split (True) or replicated (False) under TP."""
    return _layout(name, cfg) is not None


def split_for_rank(
    name: str, full: torch.Tensor, rank: int, size: int, cfg: ModelConfig
) -> torch.Tensor:
    """TP rank ``rank`` of ``size``'s shard of dense parameter ``name`` (a new tensor); a
    replicated parameter is returned unchanged. Also cuts optimizer moments of the parameter."""
    layout = _layout(name, cfg)
    if layout is None or size == 1 or full.dim() <= layout.dim:
        return full  # replicated; also a scalar kept per parameter (an optimizer's step count)
    return _split(full, layout, rank, size)


def merge_shards(name: str, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The dense parameter ``name`` from its TP shards in rank order (inverse of split_for_rank)."""
    layout = _layout(name, cfg)
    if layout is None or len(shards) == 1 or shards[0].dim() <= layout.dim:
        return shards[0]
    return _merge(list(shards), layout)


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise ConfigError when ``tp`` cannot split this model (a size it does not divide, or a
    plugin without a TP recipe). Checks only what the pattern builds."""
    if tp <= 1:
        return

    def need(key: str, value: int, what: str) -> None:
        if value % tp:
            raise ConfigError(
                key,
                f"{what} = {value} is not divisible by the tensor-parallel size {tp}; "
                f"change {key} or use a tensor-parallel size that divides {value}",
            )

    table = cfg.symbol_table()
    plugins = {table[s][1]: table[s][0] for s in cfg.layers}
    for plugin, kind in plugins.items():
        if plugin not in (TP_MIXERS if kind == "mixer" else TP_FFNS):
            raise ConfigError(
                "model.pattern",
                f"the {kind} {plugin!r} has no tensor-parallel recipe (supported: "
                f"{', '.join(TP_MIXERS + TP_FFNS)}); use tensor-parallel size 1",
            )
    need("model.vocab_pad_multiple", cfg.padded_vocab_size, "the padded vocabulary")
    if "attention" in plugins:
        need("model.n_heads", cfg.n_heads, "n_heads")
        need("model.n_kv_heads", cfg.kv_heads, "the number of kv heads")
    if "mlp" in plugins:
        need("model.ffn_hidden", cfg.ffn_hidden_size, "the FFN hidden size")
    if "moe" in plugins:
        hidden = cfg.ffn_hidden_size if cfg.moe.expert_hidden is None else cfg.moe.expert_hidden
        need("model.moe.expert_hidden", hidden, "the expert hidden size")
    if "mamba" in plugins:
        need("model.mamba.expand", cfg.mamba.expand * cfg.d_model, "Mamba's d_inner")
    if "mamba2" in plugins:
        m = cfg.mamba2
        need("model.mamba2.head_dim", m.expand * cfg.d_model // m.head_dim, "Mamba-2's heads")
        need("model.mamba2.n_groups", m.n_groups, "Mamba-2's n_groups")


# --------------------------------------------------------------------------------------------
# TP modules
# --------------------------------------------------------------------------------------------


def tp_size() -> int:
    """The TP world size (1 when Megatron's groups are not initialised)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_tensor_model_parallel_rank()


class _NoExtraState:
    """Megatron's layers add a ``_extra_state`` (None) state-dict entry and a load hook that
    expects one; ours keep the dense model's keys exactly."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hooks(self) -> None:
        self._load_state_dict_pre_hooks.clear()


class TPColumnLinear(_NoExtraState, ColumnParallelLinear):
    """Megatron's ColumnParallelLinear (no bias, output not gathered) returning a tensor."""

    def __init__(self, in_features: int, out_features: int, config: ModelParallelConfig) -> None:
        super().__init__(
            in_features,
            out_features,
            config=config,
            init_method=nn.init.zeros_,
            bias=False,
            gather_output=False,
        )
        self._drop_extra_state_hooks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class TPRowLinear(_NoExtraState, RowParallelLinear):
    """Megatron's RowParallelLinear (no bias, input already split) returning a tensor."""

    def __init__(self, in_features: int, out_features: int, config: ModelParallelConfig) -> None:
        super().__init__(
            in_features,
            out_features,
            config=config,
            init_method=nn.init.zeros_,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self._drop_extra_state_hooks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class TPEmbedding(_NoExtraState, VocabParallelEmbedding):
    """Megatron's VocabParallelEmbedding over the padded vocabulary rows."""

    def __init__(self, vocab: int, dim: int, config: ModelParallelConfig) -> None:
        super().__init__(vocab, dim, init_method=nn.init.zeros_, config=config)
        self._drop_extra_state_hooks()


class _GatherShards(torch.autograd.Function):
    """All-gather a weight's shards into the full weight (``layout``); backward: own slice.

    Exact only when the full weight's gradient is the same on every rank, which `TPPCLinear`
    guarantees by an all-reduce (`copy_to_tp_region`) after the PC map.
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, layout: Layout) -> torch.Tensor:  # type: ignore[override]
        ctx.layout = layout
        return _gather_full(shard, layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _split(grad, ctx.layout, tp_rank(), tp_size()).contiguous(), None


def _gather_full(shard: torch.Tensor, layout: Layout) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(shard) for _ in range(tp_size())]
    dist.all_gather(shards, shard.contiguous(), group=group)
    return _merge(shards, layout)


class TPPCLinear(nn.Module):
    """A PC-preconditioned projection under TP, the same function as the dense `PCLinear`.

    W_full = all-gather(lin.weight); W_eff = gamma sg(sigma) g(W_full / sigma) in full on every
    rank; `copy_to_tp_region` (identity forward, all-reduce backward); this
    rank's slice, multiplied column- or row-parallel. Then gamma gets its full gradient on every
    rank and the gather's backward (own slice) gives each rank its shard's exact gradient. The
    power iteration (``post_optimizer_step``) runs on the gathered W, so u, v stay identical.
    """

    def __init__(self, pc: PCLinear, layout: Layout, parallel: str, shard: nn.Linear) -> None:
        super().__init__()
        self.lin = shard
        self.layout, self.parallel = layout, parallel
        self.level, self.power_iter, self.eps, self.coeffs = (
            pc.level,
            pc.power_iter,
            pc.eps,
            pc.coeffs,
        )
        if isinstance(pc.gamma, nn.Parameter):
            self.gamma = pc.gamma
        else:
            self.register_buffer("gamma", pc.gamma)
        self.register_buffer("u", pc.u)
        self.register_buffer("v", pc.v)

    def full_weight(self) -> torch.Tensor:
        return _GatherShards.apply(self.lin.weight, self.layout)

    def effective_weight(self) -> torch.Tensor:
        """The full W_eff (identical on every rank)."""
        W = self.full_weight()
        with torch.autocast(W.device.type, enabled=False):
            Wf = fp32_or_wider(W)
            sigma = self.u.to(Wf.dtype) @ Wf @ self.v.to(Wf.dtype) + self.eps
            P = pc_polynomial(Wf / sigma, self.coeffs)
            return (self.gamma.to(P.dtype) * sigma.detach() * P).to(W.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """This rank's slice of W_eff (what the layer multiplies by)."""
        w = copy_to_tp_region(self.effective_weight())
        return _split(w, self.layout, tp_rank(), tp_size())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel == "column":
            return F.linear(copy_to_tp_region(x), self.weight)
        return reduce_from_tensor_model_parallel_region(F.linear(x, self.weight).contiguous())

    @torch.no_grad()
    def post_optimizer_step(self, iterations: int | None = None) -> None:
        """PCLinear's warm-started power iteration, on the gathered full W."""
        W = fp32_or_wider(_gather_full(self.lin.weight, self.layout))
        power_iteration(W, self.u, self.v, iterations or self.power_iter)

    def extra_repr(self) -> str:
        return f"{self.parallel}, level={self.level}, power_iter={self.power_iter}"


class _CopyToTPRegion(torch.autograd.Function):
    """Megatron's ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of the
    gradient), safe for non-contiguous gradients: Megatron's ``_reduce`` all-reduces a
    ``.contiguous()`` copy and returns the un-reduced original when the gradient is strided (as
    Mamba's transposed B and C are), silently dropping the other ranks' share."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


def copy_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    """A replicated value entering split computation: identity forward, all-reduce backward."""
    return _CopyToTPRegion.apply(x) if tp_size() > 1 else x


def _copy_output_to_tp_region(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: a replicated value entering channel-split computation (all-reduce its grad)."""
    return copy_to_tp_region(output)


# --------------------------------------------------------------------------------------------
# apply_tensor_parallel
# --------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, model: HybridLM, tp: int) -> None:
        self.cfg, self.tp = model.cfg, tp
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=tp,
            use_cpu_initialization=True,
            perform_initialization=False,
            gradient_accumulation_fusion=False,
            params_dtype=next(model.parameters()).dtype,
        )

    def linear(self, parent: nn.Module, attr: str, prefix: str, parallel: str) -> None:
        """Replace projection ``parent.attr`` (Linear or PCLinear) by its column/row TP form."""
        child = getattr(parent, attr)
        if child is None:
            return
        dense = child.lin if isinstance(child, PCLinear) else child
        if dense.bias is not None:
            raise NotImplementedError(f"{prefix}{attr}: projections with a bias are not split")
        out_f, in_f = dense.weight.shape
        if isinstance(child, PCLinear):
            name = f"{prefix}{attr}.lin.weight"
            layout = _layout(name, self.cfg)
            rows, cols = (out_f // self.tp, in_f) if layout.dim == 0 else (out_f, in_f // self.tp)
            shard = nn.Linear(cols, rows, bias=False)
            setattr(parent, attr, TPPCLinear(child, layout, parallel, shard))
        elif parallel == "column":
            setattr(parent, attr, TPColumnLinear(in_f, out_f, self.config))
        else:
            setattr(parent, attr, TPRowLinear(in_f, out_f, self.config))

    def mlp(self, mlp: nn.Module, prefix: str) -> None:
        self.linear(mlp, "w1", prefix, "column")
        self.linear(mlp, "w3", prefix, "column")
        self.linear(mlp, "w2", prefix, "row")

    def attention(self, att: nn.Module, prefix: str) -> None:
        for attr in ("wq", "wk", "wv"):
            self.linear(att, attr, prefix, "column")
        self.linear(att, "wo", prefix, "row")
        att.n_heads //= self.tp
        att.n_kv_heads //= self.tp

    def moe(self, moe: nn.Module, prefix: str) -> None:
        for j, expert in enumerate(moe.experts):
            self.mlp(expert, f"{prefix}experts.{j}.")

    @staticmethod
    def _param_like(old: nn.Parameter, shape: tuple[int, ...]) -> nn.Parameter:
        new = nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad)
        if hasattr(old, "_no_weight_decay"):
            new._no_weight_decay = old._no_weight_decay
        return new

    def _conv(self, conv: nn.Conv1d, channels: int) -> nn.Conv1d:
        k = conv.kernel_size[0]
        return nn.Conv1d(
            channels,
            channels,
            k,
            groups=channels,
            padding=conv.padding[0],
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )

    def mamba(self, m: nn.Module, prefix: str) -> None:
        tp = self.tp
        d = m.d_inner // tp
        self.linear(m, "in_proj", prefix, "column")
        self.linear(m, "x_proj", prefix, "row")
        self.linear(m, "out_proj", prefix, "row")
        m.conv1d = self._conv(m.conv1d, d)
        dt = m.dt_proj
        m.dt_proj = nn.Linear(dt.in_features, d, bias=True, device=dt.weight.device)
        m.A_log = self._param_like(m.A_log, (d, m.A_log.shape[1]))
        m.D = self._param_like(m.D, (d,))
        m.d_inner = d
        # dt, B, C are replicated up to here; their gradients from the split channels must sum.
        norms = (m.dt_layernorm, m.b_layernorm, m.c_layernorm)
        for module in norms if norms[0] is not None else (m.x_proj,):
            module.register_forward_hook(_copy_output_to_tp_region)

    def mamba2(self, m: nn.Module, prefix: str) -> None:
        tp = self.tp
        self.linear(m, "in_proj", prefix, "column")
        self.linear(m, "out_proj", prefix, "row")
        m.d_inner //= tp
        m.n_heads //= tp
        m.n_groups //= tp
        m.conv_dim //= tp
        m.conv1d = self._conv(m.conv1d, m.conv_dim)
        for attr in ("dt_bias", "A_log", "D"):
            setattr(m, attr, self._param_like(getattr(m, attr), (m.n_heads,)))
        m.norm.weight = self._param_like(m.norm.weight, (m.d_inner,))
        m.norm.groups //= tp


@torch.no_grad()
def _check_same_dense_model(state: dict[str, torch.Tensor]) -> None:
    """Every TP rank must start from the same dense weights (same config and seed)."""
    total = sum(float(t.double().sum()) + float(t.double().abs().sum()) for t in state.values())
    group = parallel_state.get_tensor_model_parallel_group()
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    sums = torch.tensor([total], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(sums) for _ in range(tp_size())]
    dist.all_gather(gathered, sums, group=group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(
            "apply_tensor_parallel: the TP ranks built different dense models; build the model "
            "with the same config and seed on every rank (arch.model.build_model(cfg, seed))"
        )


def apply_tensor_parallel(model: HybridLM) -> HybridLM:
    """Shard the dense ``model`` over Megatron's TP group, in place (identity for tp == 1).

    Every rank must have built the same dense model (same config and seed): each keeps its shard
    of the dense weights (`split_for_rank`). Names are unchanged; shapes shrink.
    """
    tp = tp_size()
    if tp == 1:
        return model
    cfg = model.cfg
    check_tensor_parallel(cfg, tp)
    rank = tp_rank()
    dense = dict(model.state_dict(keep_vars=True))
    _check_same_dense_model(dense)
    dense_names = list(dense)
    build = _Builder(model, tp)
    if getattr(model, "embed", None) is not None:
        model.embed = TPEmbedding(cfg.padded_vocab_size, cfg.d_model, build.config)
    if getattr(model, "head", None) is not None:
        model.head = TPColumnLinear(cfg.d_model, cfg.padded_vocab_size, build.config)
    for i, layer in enumerate(model.layers):
        inner = getattr(layer, "inner", None)
        if inner is None:
            continue  # a layer another pipeline stage holds
        getattr(build, _plugin(cfg, i))(inner, f"layers.{i}.inner.")
    state = model.state_dict(keep_vars=True)
    if list(state) != dense_names:
        raise RuntimeError(f"TP changed the state-dict keys: {set(state) ^ set(dense_names)}")
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor is dense[name]:
                continue  # kept as it was (replicated)
            shard = split_for_rank(name, dense[name].detach(), rank, tp, cfg)
            if shard.shape != tensor.shape:
                raise RuntimeError(f"{name}: shard {tuple(shard.shape)} != {tuple(tensor.shape)}")
            tensor.data = shard.contiguous()
    for name, param in model.named_parameters():
        layout = _layout(name, cfg)
        if layout is not None:
            set_tensor_model_parallel_attributes(param, True, layout.dim, layout.stride)
    return model


# --------------------------------------------------------------------------------------------
# Embedding, logits and loss
# --------------------------------------------------------------------------------------------


def parallel_embed(model: HybridLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings [B, T, d] (full on every rank; vocab-parallel lookup under TP)."""
    return model.embed(input_ids)


def parallel_logits(
    model: HybridLM, h: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits from the final-normed hidden state ``h``.

    tp == 1: [B, T, vocab_size] as `HybridLM.forward`. Under TP: [B, T, V_pad / tp], this rank's
    slice of the padded vocabulary, with the padding rows' logits at -inf (they never count).
    ``weight``: the output matrix when the model does not hold it (a last pipeline stage's copy
    of the tied embedding); by default the head's, or the embedding's when tied.
    """
    cfg = model.cfg
    if weight is None:
        weight = model.embed.weight if model.head is None else model.head.weight
    tp = tp_size()
    if tp == 1:
        return F.linear(h, weight[: cfg.vocab_size])
    logits = F.linear(copy_to_tp_region(h), weight)
    local = logits.shape[-1]
    start = tp_rank() * local
    if start + local > cfg.vocab_size:
        ids = torch.arange(start, start + local, device=logits.device)
        logits = logits.masked_fill(ids >= cfg.vocab_size, float("-inf"))
    return logits


def parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (= `arch.model.lm_loss` of the dense model)."""
    if tp_size() == 1:
        return lm_loss(logits, targets)
    # Megatron's kernel works in place on its input: give it its own copy. It computes in fp32
    # whatever it gets (it casts), so a float64 model's tensor-parallel loss is fp32-accurate.
    wide = fp32_or_wider(logits)
    logits = wide if wide is not logits else logits.clone()
    return vocab_parallel_cross_entropy(logits, targets).mean()


def parallel_forward(
    model: HybridLM, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """`HybridLM.forward` for a (possibly) tensor-parallel model: logits as `parallel_logits`."""
    state = model.state_init(parallel_embed(model, input_ids), input_ids)
    for layer in model.layers:
        state = layer(state, doc_ids)
    return parallel_logits(model, model.norm(state["x"]))
