"""The hybrid decoder: embeddings -> pattern of sub-layers over a residual state -> norm -> head.

Built unit by unit (`unit_names`), each unit from its own seeded RNG stream
(`arch.seeded_init`). With a tensor-parallel context ``tp`` (`arch.tensor_parallel_plan`)
every plugin is built in its local form from its declared plan, on the meta device, and
`materialize` fills each unit a rank holds with its shard of the one-process values; the same
``forward`` runs split. The collectives live in the context.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any

import torch
from torch import nn

from arch.aux_losses import recording
from arch.cache import InferenceCache, PerEvaluation, new_cache
from arch.config import ModelConfig, validate_model_config
from arch.layers_registry import FFNS, MIXERS, RESIDUALS
from arch.model_plan import check_tensor_parallel, expert_of, split_of
from arch.recompute import run_sublayer
from arch.residual import State
from arch.seeded_init import draw_seed, init_unit, rng_scope
from arch.tensor_parallel_plan import DENSE, TensorParallel, has_plan, split_tensor


class SubLayer(nn.Module):
    """One pattern symbol: pre-norm, the mixer or FFN plugin, and its residual update."""

    def __init__(
        self, cfg: ModelConfig, index: int, symbol: str, tp: TensorParallel = DENSE
    ) -> None:
        super().__init__()
        kind, plugin = cfg.symbol_table()[symbol]
        inner = (MIXERS if kind == "mixer" else FFNS).get(plugin)
        self.symbol = symbol
        self.kind = kind
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.tp = tp
        # Sequence parallelism in Megatron's form when the plugin names its boundary
        # projections (and no preconditioner wraps them with collectives of its own).
        boundary = inner.tensor_parallel_plan(cfg).boundary if has_plan(inner) else ()
        self.fused = tp.sequence_parallel and bool(boundary) and cfg.preconditioner.name == "none"
        # A plugin with a plan is built in its local form from the context; one without only
        # ever runs in one process (`check_tensor_parallel` refuses it at tp > 1).
        if has_plan(inner):
            self.inner = inner(cfg, index, tp.with_boundary(boundary) if self.fused else tp)
        else:
            self.inner = inner(cfg, index)
        self.residual = RESIDUALS.get(cfg.residual.name)(cfg, index)
        # Mixers that keep packed documents apart take `doc_ids`; the others never see it.
        self.takes_doc_ids = "doc_ids" in inspect.signature(self.inner.forward).parameters
        # Activation recomputation (`arch.recompute.set_recompute`): none | selective | full.
        self.recompute = "none"

    def forward(self, state: State, doc_ids: torch.Tensor | None = None) -> State:
        return run_sublayer(self.recompute, self._update, state, doc_ids)

    def _update(self, state: State, doc_ids: torch.Tensor | None) -> State:
        # Under sequence parallelism the state and the norm hold this rank's part of the
        # sequence; the plugin sees all of it (`TensorParallel.from_sequence_shard`).
        kwargs = {"doc_ids": doc_ids} if doc_ids is not None and self.takes_doc_ids else {}

        def sublayer(h: torch.Tensor) -> torch.Tensor:
            x = self.tp.from_sequence_shard(self.norm(h), partial_grad=self.fused)
            return self.tp.to_sequence_shard(self.inner(x, **kwargs), partial=self.fused)

        return self.residual(state, sublayer)

    def step(self, state: State, entry: Any, position: int) -> tuple[State, Any]:
        """`forward` for new tokens only (cached decoding, see `arch.cache`): a mixer runs its
        ``step`` from ``entry``; an FFN, per token, runs its ``forward``. Returns (state, the
        mixer's new entry, or None for an FFN).

        A residual plugin that evaluates its oracle n > 1 times (at n points) runs the mixer
        over n sequences in the full forward: the k-th evaluation then keeps its own entry
        (``PerEvaluation``), as long as every step makes the same n evaluations.
        """
        if self.kind != "mixer":
            return self.residual(state, lambda h: self.inner(self.norm(h))), None
        previous = entry if isinstance(entry, PerEvaluation) else PerEvaluation([entry])
        updated = PerEvaluation()

        def oracle(h: torch.Tensor) -> torch.Tensor:
            k = len(updated)
            y, new = self.inner.step(
                self.norm(h), previous[k] if k < len(previous) else None, position=position
            )
            updated.append(new)
            return y

        state = self.residual(state, oracle)
        if entry is not None and len(updated) != len(previous):
            raise RuntimeError(
                f"residual {type(self.residual).__name__} evaluated sub-layer "
                f"{self.residual.layer_index} {len(updated)} times in this step and "
                f"{len(previous)} in the previous ones; cached decoding needs the same number "
                "(use generate(..., use_cache=False))"
            )
        return state, updated[0] if len(updated) == 1 else updated


class HybridLM(nn.Module):
    """Decoder-only language model described by ``cfg.pattern``; returns logits [B, T, vocab].

    ``init``: build the one-process model, each unit constructed and initialised in its own RNG
    scope (`arch.seeded_init`) from ``seed`` (None: a seed drawn from the global RNG).
    ``init=False``: the bare structure, in its local form for the context ``tp``; build it on
    the meta device and `materialize` it (or copy values in).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tp: TensorParallel = DENSE,
        init: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        validate_model_config(cfg)
        if init and tp.size > 1:
            raise ValueError(
                "HybridLM(init=True) builds the one-process model; build a rank's "
                "tensor-parallel part with arch.model.build_model(cfg, seed, tp)"
            )
        self.cfg, self.tp = cfg, tp
        if init and seed is None:
            seed = draw_seed()

        def make(name: str) -> nn.Module:
            return seeded_unit(cfg, name, seed) if init else build_unit(cfg, name, tp)

        self.embed = make("embed")
        self.state_init = make("state_init")
        self.layers = nn.ModuleList(make(f"layers.{i}") for i in range(len(cfg.layers)))
        self.norm = make("norm")
        # Column-parallel over the vocabulary rows; only its weight is used (`logits`).
        self.head = None if cfg.tie_embeddings else make("head")

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (under TP this rank's slice of the padded vocabulary, see
        `logits`); ``doc_ids`` [B, T] keeps packed documents apart (see `arch.documents`)."""
        state = self.run_layers(self.embed_tokens(input_ids), doc_ids)
        return self.logits(self.norm(state["x"]))

    def embed_tokens(self, input_ids: torch.Tensor) -> State:
        """The initial residual state of token ids [B, T] (under sequence parallelism, of this
        rank's part of the sequence: the vocabulary-parallel embedding's partial sums are
        reduce-scattered)."""
        x0 = self.tp.to_sequence_shard(self.embed(input_ids), partial=True)
        return self.state_init(x0, self.tp.sequence_shard(input_ids))

    def run_layers(
        self,
        state: State,
        doc_ids: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
    ) -> State:
        """Sub-layers [start, end) over the residual state (a pipeline stage runs its range)."""
        for i in range(start, len(self.layers) if end is None else end):
            state = self.layers[i](state, doc_ids)
        return state

    def logits(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the final-normed hidden state ``h``: the real vocabulary in one process;
        under TP this rank's slice of the padded vocabulary, padding rows at -inf.
        ``weight``: the output matrix when the model does not hold it (a last pipeline stage's
        copy of the tied embedding); by default the head's, or the embedding's when tied."""
        if weight is None:
            weight = self.embed.weight if self.head is None else self.head.weight
        return self.tp.vocab_logits(h, weight, self.cfg.vocab_size)

    def new_cache(self) -> InferenceCache:
        """An empty cache for `forward_step`; CacheUnsupportedError if a sub-layer cannot step."""
        return new_cache(self)

    def forward_step(self, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """Logits [B, t, vocab] of the t new tokens ``input_ids`` [B, t] that follow the
        ``cache.position`` tokens already in ``cache`` (updated in place: entries and position).

        The same logits as `forward` over the whole sequence, at these positions: prefill with
        the prompt, then feed one token at a time. No document masking (doc_ids).
        """
        state = self.state_init(self.embed(input_ids), input_ids)
        for i, layer in enumerate(self.layers):
            state, cache.layers[i] = layer.step(state, cache.layers[i], cache.position)
        cache.position += input_ids.shape[1]
        return self.logits(self.norm(state["x"]))

    def forward_with_aux(
        self, input_ids: torch.Tensor, metrics: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the weighted auxiliary losses sub-layers report (MoE balance, z-loss).

        Training adds the losses to the LM loss; ``metrics``, if given, receives detached
        diagnostics (e.g. each MoE sub-layer's expert loads). See `arch.aux_losses`.
        """
        counts = aux_loss_counts(self.cfg)  # one process: every report is seen here
        with recording(counts, counts) as recorder:
            logits = self(input_ids)
        if metrics is not None:
            metrics.update(recorder.metrics)
        return logits, recorder.losses


def aux_loss_counts(cfg: ModelConfig, layers: range | None = None) -> dict[str, int]:
    """How many reports of each auxiliary loss one forward of sub-layers ``layers`` (default:
    all) makes, from what the plugins declare (``aux_loss_names(cfg)`` on a mixer/FFN class,
    ``oracle_calls`` on the residual class). Pipeline stages divide by the whole model's count
    (`arch.aux_losses`)."""
    table = cfg.symbol_table()
    calls = RESIDUALS.get(cfg.residual.name).oracle_calls
    counts: dict[str, int] = {}
    for i in range(len(cfg.layers)) if layers is None else layers:
        kind, plugin = table[cfg.layers[i]]
        inner = (MIXERS if kind == "mixer" else FFNS).get(plugin)
        names = inner.aux_loss_names(cfg) if hasattr(inner, "aux_loss_names") else ()
        for name in names:
            counts[name] = counts.get(name, 0) + calls
    return counts


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (targets already shifted by the caller)."""
    return DENSE.cross_entropy(logits, targets)


def unit_names(cfg: ModelConfig) -> list[str]:
    """The model's top-level units, each built and initialised on its own (`arch.seeded_init`)."""
    names = ["embed", "state_init", *(f"layers.{i}" for i in range(len(cfg.layers))), "norm"]
    return names if cfg.tie_embeddings else [*names, "head"]


def build_unit(cfg: ModelConfig, name: str, tp: TensorParallel = DENSE) -> nn.Module:
    """Unit ``name`` of the model, constructed (not initialised) in its local form for ``tp``."""
    vocab, d = cfg.padded_vocab_size, cfg.d_model
    if name == "embed":
        return tp.embedding(vocab, d)
    if name == "state_init":
        return RESIDUALS.get(cfg.residual.name).build_state_init(cfg)
    if name == "norm":
        return nn.RMSNorm(d, eps=cfg.norm_eps)
    if name == "head":
        return nn.Linear(d, vocab // tp.size, bias=False)
    index = int(name.removeprefix("layers."))
    return SubLayer(cfg, index, cfg.layers[index], tp)


def seeded_unit(cfg: ModelConfig, name: str, seed: int) -> nn.Module:
    """Unit ``name`` of the one-process model of ``seed``, constructed and initialised in its
    own RNG scopes: the same values whichever units are built around it."""
    with rng_scope(seed, name):
        unit = build_unit(cfg, name)
        init_unit(unit, name, cfg, seed)
    return unit


def build_model(cfg: ModelConfig, seed: int | None = None, tp: TensorParallel = DENSE) -> HybridLM:
    """Build the model, initialised from ``seed`` (same weights for the same seed and config;
    None: a seed from the global RNG); under a tensor-parallel context ``tp``, this rank's shard
    of that model, built shard-only (`materialize`)."""
    if tp.size == 1 and tp.expert_size == 1:
        return HybridLM(cfg, seed=seed)
    check_tensor_parallel(cfg, tp.size)
    with torch.device("meta"):
        model = HybridLM(cfg, tp=tp, init=False)
    return materialize(model, draw_seed() if seed is None else seed)


def model_fingerprint(cfg: ModelConfig, seed: int) -> str:
    """What decides a model's start values: every rank of a run must agree on it."""
    return json.dumps({"model": dataclasses.asdict(cfg), "seed": seed}, sort_keys=True, default=str)


@torch.no_grad()
def materialize(model: HybridLM, seed: int, device: str | torch.device = "cpu") -> HybridLM:
    """Allocate, on ``device``, the units a meta-device ``model`` holds (all of them, or a
    pipeline stage's: units set to None or nn.Identity are skipped) and fill each with this
    rank's shard of the one-process model of ``seed``.

    One unit at a time is built densely (`seeded_unit`), cut (`unit_shards`) and freed, so the
    dense model never exists here; the TP ranks check first that they agree on config and seed.
    """
    cfg, tp = model.cfg, model.tp
    tp.check_same_model(model_fingerprint(cfg, seed))
    for name in unit_names(cfg):
        local = held_unit(model, name)
        if local is not None:
            allocate(local, device)
            fill_unit(local, name, unit_shards(cfg, name, seed, tp), cfg, tp)
    return model


def held_unit(model: HybridLM, name: str) -> nn.Module | None:
    """Unit ``name`` of ``model``; None where a pipeline stage dropped it (None / nn.Identity)."""
    if name.startswith("layers."):
        unit = model.layers[int(name.removeprefix("layers."))]
    else:
        unit = getattr(model, name)
    return None if unit is None or isinstance(unit, nn.Identity) else unit


def allocate(module: nn.Module, device: str | torch.device) -> None:
    """``module.to_empty(device)`` keeping what is marked on its parameters (Megatron's
    ``tensor_model_parallel``, ``_no_weight_decay``): to_empty makes new Parameters."""
    marks = {name: dict(vars(p)) for name, p in module.named_parameters()}
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        vars(p).update(marks[name])


def unit_shards(
    cfg: ModelConfig, name: str, seed: int, tp: TensorParallel
) -> dict[str, torch.Tensor]:
    """This rank's shard of every parameter and buffer of unit ``name`` of the one-process
    model of ``seed`` (names relative to the unit; under expert parallelism only the experts
    it holds). Views where possible: the dense unit lives as long as they do.

    The dense unit is a whole sub-layer, all of a MoE's experts included: building only the held
    experts (each has its own seed scope) would cut that transient further."""
    dense = seeded_unit(cfg, name, seed)
    tensors = {**dict(dense.named_parameters()), **dict(dense.named_buffers())}
    out = {}
    for rel, full in tensors.items():
        if not holds(f"{name}.{rel}", cfg, tp):
            continue  # an expert another expert-parallel rank holds
        split = split_of(f"{name}.{rel}", cfg)
        shard = full if split is None else split_tensor(full, split, tp.rank, tp.size)
        out[rel] = shard.detach()
    return out


def fill_unit(
    local: nn.Module,
    name: str,
    shards: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tp: TensorParallel,
) -> None:
    """Copy unit ``name``'s shards (`unit_shards`) into its allocated local form ``local``;
    split parameters are marked (`TensorParallel.mark_split`)."""
    tensors = {**dict(local.named_parameters()), **dict(local.named_buffers())}
    if tensors.keys() != shards.keys():
        raise RuntimeError(
            f"{name}: the parallel build changed the state keys: {set(tensors) ^ set(shards)}"
        )
    for rel, tensor in tensors.items():
        if shards[rel].shape != tensor.shape:
            raise RuntimeError(
                f"{name}.{rel}: its plan gives a shard of {tuple(shards[rel].shape)}, the plugin "
                f"built {tuple(tensor.shape)}; its tensor_parallel_plan and constructor disagree"
            )
        tensor.copy_(shards[rel])
        split = split_of(f"{name}.{rel}", cfg)
        if split is not None and isinstance(tensor, nn.Parameter) and tp.size > 1:
            tp.mark_split(tensor, split)


def holds(name: str, cfg: ModelConfig, tp: TensorParallel) -> bool:
    """Whether this rank's model has dense parameter/buffer ``name``: all but the experts
    other expert-parallel ranks hold."""
    expert = expert_of(name, cfg)
    return expert is None or expert[0] in tp.local_experts(expert[1])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
