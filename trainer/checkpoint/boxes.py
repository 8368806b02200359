"""Where the pieces a rank holds lie in the dense tensor: the geometry of a sharded checkpoint.

A rank holds, of each parameter, its tensor-parallel shard (a piece of every part of the dense
tensor along the split dim, `arch.tensor_parallel_plan.Split`), and of that shard either all of
it or, under ZeRO, a contiguous range of its flattened elements. A checkpoint stores each piece
as a box (offsets, sizes) of the dense tensor, so any layout can read any box back
(`torch.distributed.checkpoint` resolves the overlaps). Here: a flat range -> boxes that are each
contiguous in memory, and a box of the local shard -> boxes of the dense tensor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from arch.tensor_parallel_plan import Split


class Box(NamedTuple):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[int, Box]]:
    """Boxes covering flat elements [start, stop) of a row-major tensor of ``shape``, in order,
    each with the flat index where it starts; each box is contiguous in memory (a partial row,
    whole rows, a partial row, recursively), so a flat slice reshaped is its data."""
    if start >= stop:
        return []
    if not shape:
        return [(0, Box((), ()))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner  # rows touched
    boxes: list[tuple[int, Box]] = []

    def row_part(row: int, lo: int, hi: int) -> None:
        for flat, box in flat_range_boxes(shape[1:], lo, hi):
            boxes.append((row * inner + flat, Box((row, *box.offsets), (1, *box.sizes))))

    if first == last:
        row_part(first, start - first * inner, stop - first * inner)
        return boxes
    if start % inner:
        row_part(first, start % inner, inner)
        first += 1
    whole_last = last if stop % inner == 0 else last - 1
    if whole_last >= first:
        zeros = (0,) * (len(shape) - 1)
        boxes.append((first * inner, Box((first, *zeros), (whole_last - first + 1, *shape[1:]))))
    if stop % inner:
        row_part(last, 0, stop % inner)
    return boxes


def tp_pieces(
    split: Split | None, local_len: int, rank: int, size: int
) -> list[tuple[int, int, int]]:
    """Where tensor rank ``rank`` of ``size``'s shard (``local_len`` long along the split dim)
    lies in the dense tensor: (local start, dense start, length) per part, in order."""
    if split is None or size == 1:
        return [(0, 0, local_len)]
    parts = [local_len * size] if split.parts is None else list(split.parts)
    pieces, local, dense = [], 0, 0
    for part in parts:
        length = part // size
        pieces.append((local, dense + rank * length, length))
        local, dense = local + length, dense + part
    return pieces


def dense_boxes(
    box: Box, split: Split | None, pieces: list[tuple[int, int, int]]
) -> list[tuple[Box, tuple[int, ...]]]:
    """A box of the local shard as boxes of the dense tensor: (the part of ``box`` in local
    coordinates, its dense offsets), cut where the shard's ``pieces`` (`tp_pieces`) meet."""
    if split is None or len(box.offsets) <= split.dim:
        return [(box, box.offsets)]
    dim, out = split.dim, []
    lo, hi = box.offsets[dim], box.offsets[dim] + box.sizes[dim]
    for local, dense, length in pieces:
        a, b = max(lo, local), min(hi, local + length)
        if a >= b:
            continue
        offsets = (*box.offsets[:dim], a, *box.offsets[dim + 1 :])
        sizes = (*box.sizes[:dim], b - a, *box.sizes[dim + 1 :])
        moved = (*box.offsets[:dim], dense + a - local, *box.offsets[dim + 1 :])
        out.append((Box(offsets, sizes), moved))
    return out


def dense_shape(local_shape: tuple[int, ...], split: Split | None, size: int) -> tuple[int, ...]:
    """The dense tensor's shape from a shard's."""
    if split is None or size == 1 or len(local_shape) <= split.dim:
        return tuple(local_shape)
    dim = split.dim
    return (*local_shape[:dim], local_shape[dim] * size, *local_shape[dim + 1 :])
