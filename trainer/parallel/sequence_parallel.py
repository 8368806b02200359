"""Sequence parallelism (Megatron's): between the tensor-parallel regions, each TP rank holds its
part of the sequence.

The residual state (every stream: x, v, m, s), the sub-layers' norms and the residual updates run
on [B, T / tp, ...]; a sub-layer all-gathers its normed input before its column-parallel
projections and reduce-scatters the row-parallel output (`arch.model.SubLayer`, plans'
``boundary``), so activations outside the TP regions take 1/tp of the memory for the same bytes
on the wire as plain TP (an all-reduce is a reduce-scatter plus an all-gather). Pipeline stages
send the sequence part.

Parameters used on a sequence part (norms, residual-update and state-initialiser parameters)
see only that part's tokens, so their gradients are summed over the TP group
(`reduce_sequence_parallel_grads`), as Megatron does for its LayerNorms. The sequence is dim 1
of our [B, T, ...] tensors (Megatron's own layers assume [T, B, ...], hence these functions).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

SEQ_DIM = 1


def _all_gather(part: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, part.contiguous(), group=group)
    return torch.cat(parts, SEQ_DIM)


def _reduce_scatter(whole: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    chunks = [c.contiguous() for c in whole.chunk(size, SEQ_DIM)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


def _slice(whole: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return whole.chunk(size, SEQ_DIM)[rank].contiguous()


class _GatherSequence(torch.autograd.Function):
    """All-gather the sequence; backward reduce-scatter (partial gradients) or slice (whole)."""

    @staticmethod
    def forward(ctx, part, group, partial_grad):  # type: ignore[override]
        ctx.group, ctx.partial_grad = group, partial_grad
        return _all_gather(part, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.partial_grad:
            return _reduce_scatter(grad, ctx.group), None, None
        return _slice(grad, ctx.group), None, None


class _ScatterSequence(torch.autograd.Function):
    """This rank's part of the sequence: reduce-scatter (partial sums) or slice (whole values);
    backward all-gather."""

    @staticmethod
    def forward(ctx, whole, group, partial):  # type: ignore[override]
        ctx.group = group
        return _reduce_scatter(whole, group) if partial else _slice(whole, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _all_gather(grad, ctx.group), None, None


def gather_sequence(
    part: torch.Tensor, group: dist.ProcessGroup, partial_grad: bool
) -> torch.Tensor:
    return _GatherSequence.apply(part, group, partial_grad)


def scatter_sequence(whole: torch.Tensor, group: dist.ProcessGroup, partial: bool) -> torch.Tensor:
    return _ScatterSequence.apply(whole, group, partial)


def sequence_part(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's part of a tensor that needs no gradient (token ids)."""
    return _slice(t, group)


def sequence_parallel_param_names(model: nn.Module) -> list[str]:
    """The parameters that run on a sequence part: everything outside the sub-layers' plugins
    (``layers.i.inner``) except the vocabulary-parallel embedding and head, whose gradients are
    whole (the embedding's comes back all-gathered; the head reads the gathered sequence)."""
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] in ("embed", "head") or (parts[0] == "layers" and parts[2] == "inner"):
            continue
        names.append(name)
    return names


def reduce_sequence_parallel_grads(model: nn.Module, group: dist.ProcessGroup) -> list[str]:
    """Sum the gradients of the parameters that see a sequence part over the TP group, inside
    backward (a hook on the parameter runs before its gradient is accumulated, so DeepSpeed's
    reduction and ZeRO's partitioning see the whole gradient). Returns their names."""
    names = sequence_parallel_param_names(model)
    params = dict(model.named_parameters())

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad

    for name in names:
        params[name].register_hook(all_reduce)
    return names
