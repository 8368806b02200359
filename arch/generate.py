"""Autoregressive sampling: greedy and nucleus (top-p)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    top_p: float | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    stop_token: int | None = None,
) -> torch.Tensor:
    """Extend input_ids [B, T] by up to max_new_tokens; greedy when top_p is None."""
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1, :].float()
        if top_p is None:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            next_id = sample_top_p(logits / max(temperature, 1e-6), top_p, generator)
        ids = torch.cat([ids, next_id], dim=1)
        if stop_token is not None and bool((next_id == stop_token).all()):
            break
    return ids


def sample_top_p(
    logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability mass reaches top_p."""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0  # the top token always survives (mass_before = 0)
    choice = torch.multinomial(
        sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator
    )
    return order.gather(-1, choice)
