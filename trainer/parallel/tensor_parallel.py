"""The Megatron tensor-parallel (TP) context: what `arch`'s plugins are built with at tp > 1.

Each plugin declares its plan and builds its local form from the context it is given
(`arch.tensor_parallel_plan`); `arch.model.build_model(cfg, seed, tp=MegatronTensorParallel())`
builds this rank's parallel form on the meta device and fills it unit by unit with its shard of
the one-process model's values (`arch.model.materialize`), so the start is exactly the
one-process model and no rank ever holds the dense one. This module supplies the pieces
over Megatron's TP group (`megatron.core.parallel_state`):

- projections: Megatron's ColumnParallelLinear / RowParallelLinear (no bias, output not
  gathered, input already split);
- embedding: VocabParallelEmbedding over the padded vocabulary rows; logits of this rank's
  vocabulary slice with the padding rows at -inf, so `cross_entropy`
  (`vocab_parallel_cross_entropy`) equals the dense `lm_loss` over the real vocabulary;
- collectives: copy-to-region (with a fix for strided gradients), reduce-from-region, and an
  all-gather whose backward keeps this rank's slice (the PC layer's full weight);
- Megatron's ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` attributes on
  split parameters (grad-norm and clipping count them on every rank, replicated ones once).
"""

from __future__ import annotations

import copy
import hashlib

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

from arch.numerics import fp32_or_wider
from arch.tensor_parallel_plan import Split, TensorParallel, merge_tensors, split_tensor
from trainer.parallel.expert_parallel import all_to_all, exchange_counts
from trainer.parallel.sequence_parallel import gather_sequence, scatter_sequence, sequence_part


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
    """Megatron's VocabParallelEmbedding over the padded vocabulary rows. ``partial``: return
    this rank's partial sums (its vocabulary rows' lookups) for the caller to reduce-scatter
    along the sequence (sequence parallelism) instead of all-reducing them here."""

    def __init__(
        self, vocab: int, dim: int, config: ModelParallelConfig, partial: bool = False
    ) -> None:
        super().__init__(vocab, dim, init_method=nn.init.zeros_, config=config)
        self._drop_extra_state_hooks()
        self.partial = partial

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.partial:
            return super().forward(ids)
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local = (ids - self.vocab_start_index).masked_fill(outside, 0)
        return F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)


def _group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


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
        dist.all_reduce(grad, group=_group())
        return grad


def _all_gather(shard: torch.Tensor, split: Split, size: int) -> torch.Tensor:
    shards = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(shards, shard.contiguous(), group=_group())
    return merge_tensors(shards, split)


class _GatherShards(torch.autograd.Function):
    """All-gather a tensor's shards into the full tensor; backward: this rank's slice.

    Exact only when the full tensor's gradient is the same on every rank, which the PC layer
    guarantees by `copy_to_region` after the PC map.
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, split: Split, rank: int, size: int) -> torch.Tensor:  # type: ignore[override]
        ctx.split, ctx.rank, ctx.size = split, rank, size
        return _all_gather(shard, split, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        shard = split_tensor(grad, ctx.split, ctx.rank, ctx.size).contiguous()
        return shard, None, None, None


class MegatronTensorParallel(TensorParallel):
    """The context over Megatron's TP group (initialised by `trainer.parallel.grid`).

    ``dtype``: the dtype Megatron allocates its layers in (the values are the dense model's).
    ``sequence_parallel``: shard the regions between the TP ones along the sequence
    (`trainer.parallel.sequence_parallel`).
    """

    def __init__(self, dtype: torch.dtype | None = None, sequence_parallel: bool = False) -> None:
        self.size = parallel_state.get_tensor_model_parallel_world_size()
        self.rank = parallel_state.get_tensor_model_parallel_rank()
        self.sequence_parallel = sequence_parallel and self.size > 1
        self.expert_size = parallel_state.get_expert_model_parallel_world_size()
        self.expert_rank = parallel_state.get_expert_model_parallel_rank()
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.size,
            use_cpu_initialization=True,
            perform_initialization=False,
            gradient_accumulation_fusion=False,
            params_dtype=dtype or torch.get_default_dtype(),
        )

    def local_linear(self, in_features: int, out_features: int, split: Split) -> nn.Module:
        layer = TPColumnLinear if split.column_parallel else TPRowLinear
        return layer(in_features, out_features, self.config)

    def copy_to_region(self, x: torch.Tensor) -> torch.Tensor:
        return _CopyToTPRegion.apply(x)

    def reduce_from_region(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_model_parallel_region(x)

    def gather(self, shard: torch.Tensor, split: Split) -> torch.Tensor:
        return _GatherShards.apply(shard, split, self.rank, self.size)

    def with_boundary(self, roles: tuple[str, ...]) -> TensorParallel:
        ctx = copy.copy(self)
        ctx.boundary_roles = frozenset(roles)
        return ctx

    def from_sequence_shard(self, h: torch.Tensor, partial_grad: bool) -> torch.Tensor:
        if not self.sequence_parallel:
            return h
        return gather_sequence(h, _group(), partial_grad)

    def to_sequence_shard(self, y: torch.Tensor, partial: bool) -> torch.Tensor:
        if not self.sequence_parallel:
            return y
        return scatter_sequence(y, _group(), partial)

    def sequence_shard(self, t: torch.Tensor) -> torch.Tensor:
        return sequence_part(t, _group()) if self.sequence_parallel else t

    def exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return exchange_counts(counts, parallel_state.get_expert_model_parallel_group())

    def all_to_all(self, rows: torch.Tensor, receive: list[int], send: list[int]) -> torch.Tensor:
        return all_to_all(rows, receive, send, parallel_state.get_expert_model_parallel_group())

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        return TPEmbedding(vocab, dim, self.config, partial=self.sequence_parallel)

    def vocab_logits(self, h: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor:
        if self.sequence_parallel:  # the whole sequence; each rank's gradient is a partial sum
            h = gather_sequence(h, _group(), partial_grad=True)
        else:
            h = self.copy_to_region(h)
        logits = F.linear(h, weight)
        local = logits.shape[-1]
        start = self.rank * local
        if start + local > vocab:
            ids = torch.arange(start, start + local, device=logits.device)
            logits = logits.masked_fill(ids >= vocab, float("-inf"))
        return logits

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Megatron's kernel works in place on its input: give it its own copy. It computes in fp32
        # whatever it gets (it casts), so a float64 model's tensor-parallel loss is fp32-accurate.
        wide = fp32_or_wider(logits)
        logits = wide if wide is not logits else logits.clone()
        return vocab_parallel_cross_entropy(logits, targets).mean()

    def mark_split(self, param: nn.Parameter, split: Split) -> None:
        set_tensor_model_parallel_attributes(param, True, split.dim, split.stride)

    def check_same_model(self, fingerprint: str) -> None:
        """Every TP rank must start from the same model (same config and seed): their
        fingerprints' hashes are compared over the TP group."""
        digest = hashlib.blake2b(fingerprint.encode(), digest_size=7).digest()
        device = "cuda" if dist.get_backend(_group()) == "nccl" else "cpu"
        mine = torch.tensor([int.from_bytes(digest, "big")], dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(gathered, mine, group=_group())
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(
                "the TP ranks start from different models; build the model with the same "
                "config and seed on every rank (arch.model.build_model(cfg, seed, tp))"
            )
