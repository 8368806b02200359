"""Expert parallelism: the experts of a MoE sub-layer spread over the expert-parallel ranks.

Each rank routes its own tokens (so routing, capacity drops, auxiliary losses and load metrics
are what one process computes for the same micro-batch), then the token rows, sorted by expert,
travel to the ranks holding their experts (all-to-all), each rank runs its experts on everything
it received, and the outputs travel back (all-to-all) to be weighted and combined where the
tokens live. Dropless: the row counts are exchanged first, nothing is padded.

The collectives come from the parallel context (`arch.tensor_parallel_plan.TensorParallel`);
in one process this is a plain loop over the experts.
"""

from __future__ import annotations

import torch
from torch import nn

from arch.tensor_parallel_plan import TensorParallel


def run_experts(
    routed: torch.Tensor, counts: torch.Tensor, experts: nn.ModuleDict, tp: TensorParallel
) -> torch.Tensor:
    """Every expert's output for ``routed`` [assignments, d], rows sorted by global expert
    index with ``counts`` [num_experts] rows each; ``experts``: this rank's (a block)."""
    if tp.expert_size == 1:
        chunks = routed.split(counts.tolist())
        return _apply(experts, chunks)
    ranks = tp.expert_size
    send = counts.view(ranks, -1)  # [destination rank, its local expert]
    received_counts = tp.exchange_counts(send)  # [source rank, this rank's local expert]
    send_sizes, receive_sizes = send.sum(1).tolist(), received_counts.sum(1).tolist()
    received = tp.all_to_all(routed, receive_sizes, send_sizes)
    # Received rows come grouped by source rank, then by expert: regroup them by expert.
    by_expert = _expert_major_order(received_counts)
    chunks = received[by_expert].split(received_counts.sum(0).tolist())
    outputs = _apply(experts, chunks)
    back = torch.empty_like(by_expert)
    back[by_expert] = torch.arange(len(by_expert), device=by_expert.device)
    return tp.all_to_all(outputs[back], send_sizes, receive_sizes)


def _apply(experts: nn.ModuleDict, chunks: tuple[torch.Tensor, ...]) -> torch.Tensor:
    # Every expert runs, an unchosen one on zero rows: its weights then get a (zero) gradient
    # like all others, so data-parallel ranks reduce the same set of gradients. A rank holds at
    # least one expert (the expert count is a multiple of the expert-parallel size).
    return torch.cat([expert(c) for expert, c in zip(experts.values(), chunks, strict=True)])


def _expert_major_order(counts: torch.Tensor) -> torch.Tensor:
    """Row indices that reorder rows grouped [source][expert] (sizes ``counts`` [S, E]) into
    [expert][source]."""
    sources, experts = counts.shape
    flat = counts.flatten()
    starts = (torch.cumsum(flat, 0) - flat).view(sources, experts).tolist()
    sizes = counts.tolist()
    pieces = [
        torch.arange(starts[s][e], starts[s][e] + sizes[s][e])
        for e in range(experts)
        for s in range(sources)
    ]
    return torch.cat(pieces).to(counts.device)
