"""What a rank holds of each parameter, as a checkpoint writes it without a gather.

Without ZeRO a rank holds its whole tensor shard and its optimizer state. Under ZeRO-1/2 it holds
a flat range of the shard's fp32 master and moments (DeepSpeed's ``_hp_mapping`` fragment: where
the parameter meets this rank's partition of the flat buffer; none when they do not meet), and
under ZeRO-3 the parameter's own partition. Each is a `Piece`: a flat start in the shard and the
values there; `trainer.checkpoint.piece_chunks` places it in the dense tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class Piece(NamedTuple):
    start: int  # flat offset in the rank's tensor shard
    values: torch.Tensor  # flat fp32 weights
    moments: dict[str, torch.Tensor]  # flat optimizer state tensors (exp_avg, ...), alike


def held_pieces(
    p: torch.nn.Parameter, zero_stage: int, optimizer: torch.optim.Optimizer, keys: list[str]
) -> list[Piece]:
    """The pieces of parameter ``p`` this rank holds (``keys``: the optimizer's state tensors;
    ``optimizer``: the plain engine's, for ZeRO stage 0)."""
    if zero_stage == 0:
        state = optimizer.state.get(p, {})
        moments = {k: state[k].reshape(-1) for k in keys if k in state}
        return [Piece(0, p.detach().reshape(-1), moments)]
    if zero_stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        start, n = zero3_range(p)
        if n == 0:
            return []
        values = safe_get_local_fp32_param(p).reshape(-1)[:n]
        moments = {k: safe_get_local_optimizer_state(p, k).reshape(-1)[:n] for k in keys}
        return [Piece(start, values, moments)]
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:  # this parameter lies wholly in other ranks' partitions
        return []
    moments = {k: mapping.get_optim_state_fragment(k) for k in keys}
    return [Piece(mapping.lp_fragment_address.start, mapping.hp_fragment, moments)]


def zero3_range(p: torch.nn.Parameter) -> tuple[int, int]:
    """(flat start, length) of this rank's ZeRO-3 partition of ``p`` (every rank's partition is
    equally long, the last ones padded past the end)."""
    partition = p.ds_tensor.numel()
    start = dist.get_rank(group=p.ds_process_group) * partition
    return start, max(0, min(partition, p.ds_numel - start))


def set_zero3_state(p: torch.nn.Parameter, shard: torch.Tensor, key: str) -> None:
    """Put this rank's partition of ``shard`` (the whole tensor shard of an optimizer state
    tensor) into ZeRO-3's partition of ``p`` (DeepSpeed's own full setter mis-cuts tensors
    smaller than the group)."""
    from deepspeed.utils import safe_set_local_optimizer_state

    start, n = zero3_range(p)
    local = torch.zeros(p.ds_tensor.numel(), dtype=shard.dtype, device=shard.device)
    local[:n] = shard.reshape(-1)[start : start + n]
    safe_set_local_optimizer_state(p, local, key)
