"""Pipeline schedules: 1F1B and its interleaved form (as in Megatron and nanotron).

1F1B: stage s of P runs min(P - s - 1, M) warm-up forwards, then alternates one forward and one
backward, then drains the remaining backwards: at most P - s micro-batches' activations are
alive at once.

Interleaved 1F1B (``parallel.virtual_stages`` v > 1, Megatron's virtual pipeline): the model is
cut into P x v chunks and rank p runs chunks p, p + P, ...; a micro-batch goes round the ring of
ranks v times. Each rank's fill and drain shrink to 1/v of 1F1B's (`bubble_fraction`), for
v times as many transfers and more activations in flight.

The caller supplies what one forward and one backward of a micro-batch (of a chunk) do on this
stage; this file only decides the order and the transfers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainer.parallel.p2p import (
    RingLink,
    Shapes,
    StageLink,
    State,
    activation_tag,
    gradient_tag,
)

# forward(mb, received_state_or_None) -> (output state or loss, saved context)
ForwardFn = Callable[[int, State | None], tuple[Any, Any]]
# backward(mb, output, output_grads_or_None, context) -> grads of the received state (or None)
BackwardFn = Callable[[int, Any, State | None, Any], State | None]


def one_f_one_b(
    num_micro_batches: int,
    stage: int,
    stages: int,
    link: StageLink,
    shapes: Shapes,
    forward: ForwardFn,
    backward: BackwardFn,
) -> None:
    m = num_micro_batches
    warmup = min(stages - stage - 1, m)
    steady = m - warmup
    in_flight: list[tuple[int, Any, Any]] = []  # (mb, output, context), oldest first
    next_fwd = 0
    next_bwd = 0

    for _ in range(warmup):
        received = link.recv_forward(shapes, next_fwd)
        output, ctx = forward(next_fwd, received)
        link.send_forward(output, shapes, next_fwd)
        in_flight.append((next_fwd, output, ctx))
        next_fwd += 1

    received = link.recv_forward(shapes, next_fwd) if steady > 0 else None
    for i in range(steady):
        output, ctx = forward(next_fwd, received)
        in_flight.append((next_fwd, output, ctx))
        out_grads = link.send_forward_recv_backward(output, shapes, next_fwd)  # None: last stage
        next_fwd += 1
        mb, out, ctx = in_flight.pop(0)
        in_grads = backward(mb, out, out_grads, ctx)
        next_bwd += 1
        if i == steady - 1:
            link.send_backward(in_grads, mb)
        else:
            received = link.send_backward_recv_forward(in_grads, shapes, next_fwd)

    for _ in range(warmup):
        mb, out, ctx = in_flight.pop(0)
        out_grads = link.recv_backward(shapes, mb)
        in_grads = backward(mb, out, out_grads, ctx)
        link.send_backward(in_grads, mb)
        next_bwd += 1
    assert next_bwd == m and not in_flight


def forward_only(
    num_micro_batches: int,
    link: StageLink,
    shapes_of: Callable[[int], Shapes],
    forward: Callable[[int, State | None], Any],
) -> list[Any]:
    """Evaluation: every micro-batch through the stages in order; returns this stage's outputs.

    ``shapes_of(mb)``: the state shapes of micro-batch mb (the last one may be smaller)."""
    outputs = []
    for mb in range(num_micro_batches):
        received = link.recv_forward(shapes_of(mb), mb)
        output = forward(mb, received)
        link.send_forward(output, shapes_of(mb), mb)  # nothing on the last stage
        outputs.append(output)
    return outputs


def bubble_fraction(stages: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """The share of a step each pipeline rank idles in the schedule's fill and drain:
    (P - 1) / (v m + P - 1) for P stages, m micro-batches and v virtual stages (v = 1: 1F1B).

    A rank computes m forwards and backwards of its v chunks, m (t_f + t_b) in all, and waits
    P - 1 chunk times, (P - 1) (t_f + t_b) / v (Narayanan et al. 2021, "Efficient large-scale
    language model training on GPU clusters", section 2.2, which quotes the ratio of the two,
    (P - 1) / (v m)). Assumes balanced chunks and free transfers; 0 without pipelining.
    """
    if stages <= 1:
        return 0.0
    return (stages - 1) / (virtual_stages * micro_batches + stages - 1)


# forward(chunk, mb, received_state_or_None) -> (output state or loss, saved context)
ChunkForwardFn = Callable[[int, int, State | None], tuple[Any, Any]]
# backward(chunk, mb, output, output_grads_or_None, context) -> grads of the received state
ChunkBackwardFn = Callable[[int, int, Any, State | None, Any], State | None]


@dataclass(frozen=True)
class InterleavedOrder:
    """Which chunk and micro-batch each forward and backward of a rank runs (Megatron's order).

    Micro-batches go in groups of P: the group through chunk 0, then through chunk 1, ...; so
    the k-th forward of a rank runs `chunk(k)` on `micro_batch(k)`. Backwards visit the chunks
    in reverse (the gradient enters at the model's last chunk), each chunk's micro-batches in
    their forward order.
    """

    stages: int
    chunks: int
    micro_batches: int

    @property
    def total(self) -> int:
        """Forwards (and backwards) per rank and step."""
        return self.chunks * self.micro_batches

    def chunk(self, k: int, forward: bool = True) -> int:
        c = k % (self.stages * self.chunks) // self.stages
        return c if forward else self.chunks - 1 - c

    def micro_batch(self, k: int) -> int:
        group, within = divmod(k, self.stages * self.chunks)
        return group * self.stages + within % self.stages

    def warmup(self, stage: int) -> int:
        """Forwards before the first backward: (P - p - 1) x 2 + (v - 1) x P, enough for the
        first micro-batch to reach the model's last chunk and its gradient to come back; all of
        them when m = P (no steady state: every forward, then every backward)."""
        if self.micro_batches == self.stages:
            return self.total
        return min(self.total, 2 * (self.stages - stage - 1) + (self.chunks - 1) * self.stages)


def interleaved_one_f_one_b(
    num_micro_batches: int,
    stage: int,
    stages: int,
    chunks: int,
    link: RingLink,
    shapes: Shapes,
    forward: ChunkForwardFn,
    backward: ChunkBackwardFn,
) -> None:
    """Interleaved 1F1B over ``chunks`` chunks per rank; ``num_micro_batches`` a multiple of
    ``stages`` (Megatron's rule; `trainer.parallel.layout` refuses other counts).

    Warm-up forwards, then one forward and one backward at a time, then the remaining
    backwards; after each of these steps one `RingLink.communicate` sends what the step made
    and receives what a later step needs, so the ranks' transfers pair up without deadlock.
    At most ``warmup(stage) + 1`` micro-batch chunks are in flight on a rank.
    """
    order = InterleavedOrder(stages, chunks, num_micro_batches)
    if num_micro_batches % stages:
        raise ValueError(f"{num_micro_batches} micro-batches do not divide into {stages} stages")
    total, warmup = order.total, order.warmup(stage)
    steady = total - warmup
    first_rank, last_rank = stage == 0, stage == stages - 1
    inputs: list[deque] = [deque() for _ in range(chunks)]  # states awaiting their forward
    grads: list[deque] = [deque() for _ in range(chunks)]  # gradients awaiting their backward
    in_flight: list[deque] = [deque() for _ in range(chunks)]  # (mb, output, ctx), oldest first

    def virtual(c: int) -> int:  # the chunk's place in the model
        return c * stages + stage

    def starts_model(c: int) -> bool:
        return first_rank and c == 0

    def ends_model(c: int) -> bool:
        return last_rank and c == chunks - 1

    def run_forward(k: int) -> tuple[State, int] | None:
        """Forward k; returns (output, tag) to send on, None on the model's last chunk."""
        c, mb = order.chunk(k), order.micro_batch(k)
        received = None if starts_model(c) else inputs[c].popleft()
        output, ctx = forward(c, mb, received)
        in_flight[c].append((mb, output, ctx))
        return None if ends_model(c) else (output, activation_tag(virtual(c) + 1))

    def run_backward(k: int) -> tuple[State, int] | None:
        """Backward k; returns (input grads, tag) to send back, None on the model's first."""
        c = order.chunk(k, forward=False)
        mb, output, ctx = in_flight[c].popleft()
        output_grads = None if ends_model(c) else grads[c].popleft()
        input_grads = backward(c, mb, output, output_grads, ctx)
        return None if starts_model(c) else (input_grads, gradient_tag(virtual(c) - 1))

    def transfer(
        send_forward: tuple[State, int] | None,
        forward_chunk: int | None,
        send_backward: tuple[State, int] | None,
        backward_chunk: int | None,
        what: str,
    ) -> None:
        """Send what a step made; receive the state for ``forward_chunk`` and the gradients
        for ``backward_chunk`` (None: nothing arrives)."""
        received, received_grads = link.communicate(
            shapes,
            send_forward=send_forward,
            recv_forward=None if forward_chunk is None else activation_tag(virtual(forward_chunk)),
            send_backward=send_backward,
            recv_backward=None if backward_chunk is None else gradient_tag(virtual(backward_chunk)),
            what=what,
        )
        if forward_chunk is not None:
            inputs[forward_chunk].append(received)
        if backward_chunk is not None:
            grads[backward_chunk].append(received_grads)

    def next_input_chunk(k: int) -> int | None:
        """The chunk whose input arrives with the transfer after forward k (warm-up, and the
        other ranks' steady state): forward k + 1's, unless the model's first chunk."""
        if k + 1 >= total or starts_model(order.chunk(k + 1)):
            return None
        return order.chunk(k + 1)

    # The first rank is P - 1 forwards ahead of the last one, which feeds it: what arrives
    # from the last rank is the output of the last rank's forward k - (P - 1), for the next
    # chunk (none after the model's last chunk). Likewise for gradients reaching the last rank.
    def first_rank_input_chunk(k: int) -> int | None:
        c = order.chunk(k - (stages - 1))
        return None if c == chunks - 1 else c + 1

    def last_rank_gradient_chunk(k: int) -> int | None:
        if k < stages - 1:
            return None
        c = order.chunk(k - (stages - 1), forward=False)
        return None if c == 0 else c - 1

    def next_gradient_chunk(k: int) -> int | None:
        """The chunk whose output gradients arrive with the transfer after backward k
        (cool-down, and the other ranks' steady state): backward k + 1's, unless the model's
        last chunk."""
        if k + 1 >= total or ends_model(order.chunk(k + 1, forward=False)):
            return None
        return order.chunk(k + 1, forward=False)

    if not starts_model(0):
        transfer(None, 0, None, None, "receive activations (chunk 0, mb 0)")
    for k in range(warmup):
        sent = run_forward(k)
        # The last warm-up transfer also brings the gradients of the first backward.
        first_grads = k == warmup - 1 and steady > 0 and not ends_model(chunks - 1)
        transfer(
            sent,
            next_input_chunk(k),
            None,
            chunks - 1 if first_grads else None,
            f"warm-up transfer after forward {k} (chunk {order.chunk(k)}, "
            f"mb {order.micro_batch(k)})",
        )
    for k in range(steady):
        fk, bk = k + warmup, k
        sent_forward = run_forward(fk)
        sent_backward = run_backward(bk)
        if k == steady - 1:
            input_chunk = None  # the last forward has run
        elif first_rank:
            input_chunk = first_rank_input_chunk(fk)
        else:
            input_chunk = order.chunk(fk + 1)
        if last_rank:
            grad_chunk = last_rank_gradient_chunk(bk)
        else:
            grad_chunk = order.chunk(bk + 1, forward=False)
        transfer(
            sent_forward,
            input_chunk,
            sent_backward,
            grad_chunk,
            f"1F1B transfer after forward {fk} (chunk {order.chunk(fk)}, mb "
            f"{order.micro_batch(fk)}) and backward {bk} (chunk {order.chunk(bk, False)})",
        )
    if steady == 0 and not ends_model(chunks - 1):
        transfer(None, None, None, chunks - 1, "receive gradients (first backward)")
    for k in range(steady, total):
        sent = run_backward(k)
        transfer(
            None,
            None,
            sent,
            next_gradient_chunk(k),
            f"cool-down transfer after backward {k} (chunk {order.chunk(k, False)})",
        )
    assert not any(in_flight) and not any(inputs) and not any(grads)


def interleaved_forward_only(
    num_micro_batches: int,
    stage: int,
    stages: int,
    chunks: int,
    link: RingLink,
    shapes_of: Callable[[int], Shapes],
    forward: Callable[[int, int, State | None], Any],
) -> list[Any]:
    """Evaluation with chunks: each micro-batch through every chunk in model order, then the
    next one (any number of micro-batches; the ranks take turns, which evaluation, a small
    share of a run, can afford). Returns the outputs of the model's last chunk on the last
    rank, [] elsewhere. ``forward(chunk, mb, received)``."""
    outputs = []
    first_rank, last_rank = stage == 0, stage == stages - 1
    for mb in range(num_micro_batches):
        shapes = shapes_of(mb)
        for c in range(chunks):
            virtual = c * stages + stage
            received = None
            if not (first_rank and c == 0):
                received, _ = link.communicate(
                    shapes,
                    recv_forward=activation_tag(virtual),
                    what=f"receive activations (chunk {c}, mb {mb})",
                )
            output = forward(c, mb, received)
            if last_rank and c == chunks - 1:
                outputs.append(output)
            else:
                link.communicate(
                    shapes,
                    send_forward=(output, activation_tag(virtual + 1)),
                    what=f"send activations (chunk {c}, mb {mb})",
                )
    return outputs
