"""The 1F1B pipeline schedule (non-interleaved, as in Megatron and nanotron).

Stage s of P runs min(P - s - 1, M) warm-up forwards, then alternates one forward and one
backward, then drains the remaining backwards: at most P - s micro-batches' activations are
alive at once. The caller supplies what one forward and one backward of a micro-batch do on this
stage; this file only decides the order and the transfers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainer.parallel.p2p import Shapes, StageLink, State

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
