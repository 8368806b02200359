"""Pattern strings for published layouts, from their own shorthand.

Jamba describes its stack with two (period, offset) pairs over *layers*, where a layer is a mixer
plus an FFN; our pattern has one symbol per residual sub-layer, so a Jamba layer is two symbols.
"""

from __future__ import annotations


def jamba_pattern(
    num_layers: int,
    attn_period: int = 8,
    attn_offset: int = 4,
    expert_period: int = 2,
    expert_offset: int = 1,
) -> str:
    """Jamba's layout as a pattern: layer i is attention iff i % attn_period == attn_offset (else
    Mamba), and has an MoE FFN iff i % expert_period == expert_offset (else a dense MLP).

    >>> jamba_pattern(8)
    'M-MEM-ME*-MEM-ME'
    """
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    for name, period, offset in (
        ("attn", attn_period, attn_offset),
        ("expert", expert_period, expert_offset),
    ):
        if period <= 0 or not 0 <= offset < period:
            raise ValueError(
                f"{name}_offset must be in [0, {name}_period) with a positive period, "
                f"got period {period}, offset {offset}"
            )
    return "".join(
        ("*" if i % attn_period == attn_offset else "M")
        + ("E" if i % expert_period == expert_offset else "-")
        for i in range(num_layers)
    )
