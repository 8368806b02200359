"""Expert parallelism (EP) over Megatron's expert groups: collectives and gradient reduction.

The expert-parallel group is carved out of the data-parallel ranks (Megatron's order: ``ep``
consecutive data-parallel ranks with the same stage and tensor rank). Each holds a block of every
MoE sub-layer's experts (`arch.expert_parallel`) and its own batches, so:

- an expert's gradient on its rank already sums the contributions of the tokens of all ``ep``
  ranks (they came through the all-to-all), and only the ranks holding the same experts (the
  *expert-data-parallel* group, dp / ep ranks) must reduce it;
- every other parameter is replicated over all dp ranks as before.

DeepSpeed is given the expert-data-parallel group as its data-parallel group (it reduces, and
ZeRO partitions, over dp / ep ranks) and TP x PP x EP as its model-parallel group (the gradient
norm sums over it). Hooks inside backward (`reduce_expert_parallel_grads`) finish the job: a
dense gradient is summed over the EP group, and every gradient is divided by ``ep``, so what
DeepSpeed averages over dp / ep ranks is the mean over all dp ranks. For the norm, the dense
parameters of EP ranks other than 0 are marked ``ds_pipe_replicated`` (DeepSpeed's own marker
for a parameter counted on another rank), so each is counted once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from arch.config import ModelConfig
from arch.model_plan import expert_of


class _AllToAll(torch.autograd.Function):
    """Blocks of rows to each rank of ``group``; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, rows, receive, send, group):  # type: ignore[override]
        ctx.receive, ctx.send, ctx.group = receive, send, group
        out = rows.new_empty((sum(receive), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return out, None, None, None


def all_to_all(
    rows: torch.Tensor, receive: list[int], send: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    return _AllToAll.apply(rows, receive, send, group)


def exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Row i of ``counts`` goes to rank i; row i of the result came from rank i."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def reduce_expert_parallel_grads(
    model: nn.Module, cfg: ModelConfig, group: dist.ProcessGroup, ep_rank: int
) -> None:
    """Register the gradient hooks described in the module docstring on ``model`` (a stage's
    HybridLM, dense names); a hook on a parameter runs before its gradient is accumulated."""
    size = dist.get_world_size(group)

    def expert(grad: torch.Tensor) -> torch.Tensor:
        return grad / size

    def dense(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad / size

    for name, p in model.named_parameters():
        if expert_of(name, cfg) is not None:
            p.register_hook(expert)
        else:
            p.register_hook(dense)
            p.ds_pipe_replicated = ep_rank != 0
