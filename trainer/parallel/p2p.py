"""Point-to-point transfers of the residual state between pipeline stages.

The state is a dict of [B, T, ...] streams (x, momentum, moments); both sides know its shapes
from the model config (`stages.state_shapes`), so only the tensors travel, in sorted key order.
Every transfer posts all its sends and receives at once (`batch_isend_irecv`), the pattern that
keeps 1F1B deadlock-free.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.parallel.watchdog import operation

Shapes = dict[str, tuple[torch.Size, torch.dtype]]
State = dict[str, torch.Tensor]


def _empty(shapes: Shapes, device: torch.device) -> State:
    return {
        k: torch.empty(shape, dtype=dtype, device=device) for k, (shape, dtype) in shapes.items()
    }


def _check(state: State, shapes: Shapes, what: str) -> None:
    got = {k: (v.shape, v.dtype) for k, v in sorted(state.items())}
    if got != shapes:
        raise RuntimeError(
            f"pipeline {what}: the residual state is {got}, the receiving stage expects {shapes} "
            f"(a residual plugin whose state changes shape cannot be pipelined)"
        )


def exchange(
    send: list[tuple[torch.Tensor, int]], recv: list[tuple[torch.Tensor, int]], what: str
) -> None:
    """Post every send and receive (tensor, peer global rank) together and wait for all."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in send]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recv]
    if not ops:
        return
    with operation(what):
        for request in dist.batch_isend_irecv(ops):
            request.wait()


class StageLink:
    """Send/receive helpers for one stage: to ``next_rank`` / from ``prev_rank`` (or None)."""

    def __init__(self, prev_rank: int | None, next_rank: int | None, device: torch.device) -> None:
        self.prev, self.next, self.device = prev_rank, next_rank, device

    def recv_forward(self, shapes: Shapes, mb: int) -> State | None:
        if self.prev is None:
            return None
        state = _empty(shapes, self.device)
        exchange([], [(t, self.prev) for t in state.values()], f"receive activations (mb {mb})")
        return state

    def send_forward(self, state: State, shapes: Shapes, mb: int) -> None:
        if self.next is None:
            return
        _check(state, shapes, "send")
        sends = [(state[k].detach(), self.next) for k in shapes]
        exchange(sends, [], f"send activations (mb {mb})")

    def recv_backward(self, shapes: Shapes, mb: int) -> State | None:
        if self.next is None:
            return None
        grads = _empty(shapes, self.device)
        exchange([], [(t, self.next) for t in grads.values()], f"receive gradients (mb {mb})")
        return grads

    def send_backward(self, grads: State | None, mb: int) -> None:
        if self.prev is None or grads is None:
            return
        exchange([(g, self.prev) for g in grads.values()], [], f"send gradients (mb {mb})")

    def send_forward_recv_backward(self, state: State, shapes: Shapes, mb: int) -> State | None:
        if self.next is None:
            return None
        _check(state, shapes, "send")
        grads = _empty(shapes, self.device)
        exchange(
            [(state[k].detach(), self.next) for k in shapes],
            [(t, self.next) for t in grads.values()],
            f"send activations / receive gradients (mb {mb})",
        )
        return grads

    def send_backward_recv_forward(
        self, grads: State | None, shapes: Shapes, mb: int
    ) -> State | None:
        if self.prev is None:
            return None
        state = _empty(shapes, self.device)
        exchange(
            [(g, self.prev) for g in (grads or {}).values()],
            [(t, self.prev) for t in state.values()],
            f"send gradients / receive activations (mb {mb})",
        )
        return state
