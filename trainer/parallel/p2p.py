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
    send: list[tuple[torch.Tensor, int]],
    recv: list[tuple[torch.Tensor, int]],
    what: str,
    send_tags: list[int] | None = None,
    recv_tags: list[int] | None = None,
) -> None:
    """Post every send and receive (tensor, peer global rank) together and wait for all."""
    send_tags = send_tags or [0] * len(send)
    recv_tags = recv_tags or [0] * len(recv)
    ops = [
        dist.P2POp(dist.isend, t.contiguous(), peer, tag=tag)
        for (t, peer), tag in zip(send, send_tags, strict=True)
    ]
    ops += [
        dist.P2POp(dist.irecv, t, peer, tag=tag)
        for (t, peer), tag in zip(recv, recv_tags, strict=True)
    ]
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


# Tags of the interleaved schedule's transfers: what enters virtual stage s (chunk c of rank p
# is virtual stage c * P + p) is tagged with s, so a sender and a receiver that disagreed on
# the chunk would fail loudly (the watchdog names the transfer) instead of mixing chunks up.
# Far from the other point-to-point tags (the tied embedding's 17).
_TAG_BASE = 1 << 16


def activation_tag(virtual_stage: int) -> int:
    """Tag of the residual state entering ``virtual_stage``."""
    return _TAG_BASE + 2 * virtual_stage


def gradient_tag(virtual_stage: int) -> int:
    """Tag of the gradients entering ``virtual_stage`` from the one after it."""
    return _TAG_BASE + 2 * virtual_stage + 1


class RingLink:
    """The interleaved schedule's transfers for one pipeline rank: its stages form a ring (the
    last rank's chunk c feeds the first rank's chunk c + 1), so both neighbours always exist.

    `communicate` posts up to four transfers in one `batch_isend_irecv`, in a fixed order: the
    sends (activations to the next rank, then gradients to the previous), then the receives
    (activations from the previous rank, then gradients from the next). Between any two ranks
    the sends of one and the receives of the other then come in the same order, activations
    first (NCCL matches by order alone; at pp 2 one peer is both neighbours).
    """

    def __init__(self, prev_rank: int, next_rank: int, device: torch.device) -> None:
        self.prev, self.next, self.device = prev_rank, next_rank, device

    def communicate(
        self,
        shapes: Shapes,
        send_forward: tuple[State, int] | None = None,
        recv_forward: int | None = None,
        send_backward: tuple[State, int] | None = None,
        recv_backward: int | None = None,
        what: str = "",
    ) -> tuple[State | None, State | None]:
        """Send (state, tag) forward / (grads, tag) backward; receive the states tagged
        ``recv_forward`` from the previous rank and the gradients tagged ``recv_backward`` from
        the next. Returns (received state, received gradients), None where none was asked."""
        sends, send_tags, recvs, recv_tags = [], [], [], []
        received = grads = None
        if send_forward is not None:
            state, tag = send_forward
            _check(state, shapes, "send")
            sends += [(state[k].detach(), self.next) for k in shapes]
            send_tags += [tag] * len(shapes)
        if recv_forward is not None:
            received = _empty(shapes, self.device)
            recvs += [(t, self.prev) for t in received.values()]
            recv_tags += [recv_forward] * len(shapes)
        if send_backward is not None:
            state, tag = send_backward
            sends += [(state[k], self.prev) for k in shapes]
            send_tags += [tag] * len(shapes)
        if recv_backward is not None:
            grads = _empty(shapes, self.device)
            recvs += [(t, self.next) for t in grads.values()]
            recv_tags += [recv_backward] * len(shapes)
        exchange(sends, recvs, what, send_tags, recv_tags)
        return received, grads
