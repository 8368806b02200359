"""The whole model's tensor-parallel plan, composed from what its plugins declare.

A dense parameter name (``layers.3.inner.wq.weight``) resolves to the plan of the plugin that
owns it (the mixer/FFN under ``inner``, the residual update under ``residual``, the
preconditioner for the weight it wraps); the vocabulary rows of the embedding and the untied
head are split; everything else (norms, the residual state's initialiser) is replicated. Pure
functions of the name and the config, so checkpoints reshard without building a model.
"""

from __future__ import annotations

import torch

from arch.config import ModelConfig
from arch.layers_registry import FFNS, MIXERS, PRECONDITIONERS, RESIDUALS
from arch.registry import ConfigError
from arch.tensor_parallel_plan import (
    COLUMN_PARALLEL,
    REPLICATED,
    Split,
    TensorParallelPlan,
    has_plan,
    merge_tensors,
    split_tensor,
)

VOCAB_PARALLEL = {"embed.weight": COLUMN_PARALLEL, "head.weight": COLUMN_PARALLEL}
PLANNED_KINDS = ("mixer", "ffn", "residual", "preconditioner")  # the kinds that declare plans


def _plan(plugin: object, cfg: ModelConfig) -> TensorParallelPlan:
    return plugin.tensor_parallel_plan(cfg) if has_plan(plugin) else REPLICATED


def _owners(cfg: ModelConfig) -> list[tuple[str, str, object, str]]:
    """(kind, name, plugin, config key) of every plugin the model builds, once each."""
    table = cfg.symbol_table()
    out, seen = [], set()
    for symbol in cfg.layers:
        kind, name = table[symbol]
        if (kind, name) not in seen:
            seen.add((kind, name))
            registry = MIXERS if kind == "mixer" else FFNS
            out.append((kind, name, registry.get(name), "model.pattern"))
    out.append(("residual", cfg.residual.name, RESIDUALS.get(cfg.residual.name), "model.residual"))
    precond = cfg.preconditioner.name
    out.append(("preconditioner", precond, PRECONDITIONERS.get(precond), "model.preconditioner"))
    return out


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise ConfigError (one line) when ``tp`` cannot split this model: a plugin without a
    plan, or a size its plan needs divided that ``tp`` does not divide."""
    if tp <= 1:
        return
    needs = {"model.vocab_pad_multiple": cfg.padded_vocab_size}
    for kind, name, plugin, key in _owners(cfg):
        if not has_plan(plugin):
            raise ConfigError(
                f"{key}.name" if kind in ("residual", "preconditioner") else key,
                f"the {kind} {name!r} declares no tensor-parallel plan; give it a "
                f"`tensor_parallel_plan(cfg)` classmethod (see README, 'Write a plugin') or use "
                f"tensor-parallel size 1",
            )
        needs.update(plugin.tensor_parallel_plan(cfg).divisible)
    for key, value in needs.items():
        if value % tp:
            raise ConfigError(
                key,
                f"sets a size of {value}, which is not divisible by the tensor-parallel size "
                f"{tp}; change {key} or use a tensor-parallel size that divides {value}",
            )


def split_of(name: str, cfg: ModelConfig) -> Split | None:
    """How dense parameter/buffer ``name`` is split under TP; None: replicated."""
    if name in VOCAB_PARALLEL:
        return VOCAB_PARALLEL[name]
    parts = name.split(".", 3)
    if len(parts) < 4 or parts[0] != "layers" or parts[2] not in ("inner", "residual"):
        return None  # norms, the residual state's initialiser
    if parts[2] == "residual":
        return _plan(RESIDUALS.get(cfg.residual.name), cfg).split_of(parts[3])
    kind, plugin = cfg.symbol_table()[cfg.layers[int(parts[1])]]
    plan = _plan((MIXERS if kind == "mixer" else FFNS).get(plugin), cfg)
    split = plan.split_of(parts[3])
    wraps = _plan(PRECONDITIONERS.get(cfg.preconditioner.name), cfg).wraps
    if split is None and wraps and parts[3].endswith(f".{wraps}"):
        projection = parts[3][: -len(wraps) - 1]
        split = plan.split_of(f"{projection}.weight")
    return split


def expert_of(name: str, cfg: ModelConfig) -> tuple[int, int] | None:
    """(global expert index, the plugin's expert count) of dense parameter/buffer ``name`` when
    it belongs to an expert that expert parallelism distributes (its plugin's plan names
    ``experts``), else None."""
    parts = name.split(".", 5)
    if len(parts) < 6 or parts[0] != "layers" or parts[2] != "inner":
        return None
    kind, plugin = cfg.symbol_table()[cfg.layers[int(parts[1])]]
    plan = _plan((MIXERS if kind == "mixer" else FFNS).get(plugin), cfg)
    if plan.experts is None or parts[3] != plan.experts:
        return None
    return int(parts[4]), plan.num_experts


def expert_plugins(cfg: ModelConfig) -> list[tuple[str, int]]:
    """(plugin name, expert count) of every plugin of the model whose experts expert
    parallelism can distribute."""
    out = []
    for kind, name, plugin, _ in _owners(cfg):
        if kind in ("mixer", "ffn") and has_plan(plugin):
            plan = plugin.tensor_parallel_plan(cfg)
            if plan.experts is not None:
                out.append((name, plan.num_experts))
    return out


def is_tensor_parallel_param(name: str, cfg: ModelConfig) -> bool:
    """Whether dense parameter ``name`` is split (True) or replicated (False) under TP."""
    return split_of(name, cfg) is not None


def split_for_rank(
    name: str, full: torch.Tensor, rank: int, size: int, cfg: ModelConfig
) -> torch.Tensor:
    """TP rank ``rank`` of ``size``'s shard of dense parameter ``name`` (a new tensor); a
    replicated parameter is returned unchanged. Also cuts optimizer moments of the parameter."""
    split = split_of(name, cfg)
    if split is None or size == 1 or full.dim() <= split.dim:
        return full  # replicated; also a scalar kept per parameter (an optimizer's step count)
    return split_tensor(full, split, rank, size).clone()


def merge_shards(name: str, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The dense parameter ``name`` from its TP shards in rank order (inverse of split_for_rank)."""
    split = split_of(name, cfg)
    if split is None or len(shards) == 1 or shards[0].dim() <= split.dim:
        return shards[0]
    return merge_tensors(list(shards), split)


def tensor_parallel_note(kind: str, plugin: object) -> str:
    """What `registry list` adds to a model plugin's line: its forward's collectives under
    tensor parallelism (sizes from the default config), or that it has no plan."""
    if kind not in PLANNED_KINDS:
        return ""
    if not has_plan(plugin):
        return "  [tp: no plan, tensor-parallel size 1 only]"
    return f"  [tp: {plugin.tensor_parallel_plan(ModelConfig()).collectives}]"
