"""The hybrid decoder: embeddings -> pattern of sub-layers over a residual state -> norm -> head.

Built for one process by default; with a tensor-parallel context ``tp``
(`arch.tensor_parallel_plan`) every plugin is built in its local form from its declared plan
(`shard_model`), and the same ``forward`` runs split. The collectives live in the context.
"""

from __future__ import annotations

import inspect
import math
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
from arch.tensor_parallel_plan import DENSE, TensorParallel, has_plan, split_tensor

# Projections whose output is added to the residual stream: initialised smaller (GPT-2 / Megatron).
RESIDUAL_OUT_ROLES = ("wo", "w2", "out_proj")


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

    ``tp``: the parallel context its plugins are built with; ``init=False`` skips the
    initialisation (`shard_model` copies the dense model's values in instead).
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = DENSE, init: bool = True) -> None:
        super().__init__()
        validate_model_config(cfg)
        self.cfg, self.tp = cfg, tp
        vocab, d = cfg.padded_vocab_size, cfg.d_model
        self.embed = tp.embedding(vocab, d)
        self.state_init = RESIDUALS.get(cfg.residual.name).build_state_init(cfg)
        self.layers = nn.ModuleList(SubLayer(cfg, i, s, tp) for i, s in enumerate(cfg.layers))
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        # Column-parallel over the vocabulary rows; only its weight is used (`logits`).
        self.head = None if cfg.tie_embeddings else nn.Linear(d, vocab // tp.size, bias=False)
        if init:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; residual-output projections scaled by 1/sqrt(N).

        N is the number of residual additions (sub-layers): GPT-2's rule, which Megatron writes
        as 1/sqrt(2 L) for L blocks of two sub-layers each.

        Then every sub-module with a ``post_init_weights()`` method re-applies its special init
        (e.g. Mamba's A, D and dt bias), so a plugin's init survives this generic pass.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(len(self.layers))
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = any(f".{role}" in f".{name}" for role in RESIDUAL_OUT_ROLES)
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for module in self.modules():
            if module is not self and callable(getattr(module, "post_init_weights", None)):
                module.post_init_weights()

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


def build_model(cfg: ModelConfig, seed: int | None = None, tp: TensorParallel = DENSE) -> HybridLM:
    """Build the model, initialised from ``seed`` (same weights for the same seed and config);
    under a tensor-parallel context ``tp``, this rank's part of that model (`shard_model`)."""
    if seed is None:
        return shard_model(HybridLM(cfg), tp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dense = HybridLM(cfg)
    return shard_model(dense, tp)


@torch.no_grad()
def shard_model(dense: HybridLM, tp: TensorParallel) -> HybridLM:
    """The model ``dense`` built in its parallel form for this rank of ``tp``, holding its shard
    of every dense value (`arch.model_plan.split_of`); ``dense`` itself at size 1.

    Every rank must pass the same dense model (same config and seed): the start is then exactly
    the one-process model. Names are the dense ones; split parameters are marked (`mark_split`).
    """
    if tp.size == 1 and tp.expert_size == 1:
        return dense
    cfg = dense.cfg
    check_tensor_parallel(cfg, tp.size)
    state = dense.state_dict()
    tp.check_same_model(state)
    with torch.random.fork_rng(devices=[]):  # the local build's throwaway init draws nothing
        model = HybridLM(cfg, tp=tp, init=False)
    local = model.state_dict(keep_vars=True)
    # The local keys are the dense ones, less the experts other expert-parallel ranks hold.
    held = [n for n in state if holds(n, cfg, tp)]
    if list(local) != held:
        raise RuntimeError(f"the parallel build changed the state keys: {set(local) ^ set(held)}")
    for name, tensor in local.items():
        split = split_of(name, cfg)
        shard = state[name] if split is None else split_tensor(state[name], split, tp.rank, tp.size)
        if shard.shape != tensor.shape:
            raise RuntimeError(
                f"{name}: its plan gives a shard of {tuple(shard.shape)}, the plugin built "
                f"{tuple(tensor.shape)}; its tensor_parallel_plan and constructor disagree"
            )
        tensor.data = shard.clone(memory_format=torch.contiguous_format)
        if split is not None and isinstance(tensor, nn.Parameter):
            tp.mark_split(tensor, split)
    return model


def holds(name: str, cfg: ModelConfig, tp: TensorParallel) -> bool:
    """Whether this rank's model has dense parameter/buffer ``name``: all but the experts
    other expert-parallel ranks hold."""
    expert = expert_of(name, cfg)
    return expert is None or expert[0] in tp.local_experts(expert[1])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
