"""Autoregressive sampling: greedy and nucleus (top-p), with an inference cache by default."""

from __future__ import annotations

import torch
from torch import nn

from arch.cache import cache_unsupported_reason, new_cache


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
    use_cache: bool | None = None,
) -> torch.Tensor:
    """Extend input_ids [B, T] by up to max_new_tokens; greedy when top_p is None.

    ``use_cache``: True decodes incrementally (`HybridLM.forward_step`: the prompt in one
    prefill, then one token per step; CacheUnsupportedError if a sub-layer cannot step), False
    recomputes the full forward over the whole sequence for every token, None (default) uses
    the cache whenever the model supports it. Both give the same tokens (logits agree to fp
    rounding).
    """
    if use_cache is None:
        use_cache = cache_unsupported_reason(model) is None
    ids = input_ids
    if use_cache:
        cache = new_cache(model)
        step_input = ids
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model.forward_step(step_input, cache)[:, -1, :].float()
        else:
            logits = model(ids)[:, -1, :].float()
        next_id = pick(logits, top_p, temperature, generator)
        ids = torch.cat([ids, next_id], dim=1)
        step_input = next_id
        if stop_token is not None and bool((next_id == stop_token).all()):
            break
    return ids


def pick(
    logits: torch.Tensor,
    top_p: float | None,
    temperature: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token [B, 1] from last-position logits [B, V]: argmax, or a top-p sample."""
    if top_p is None:
        return logits.argmax(dim=-1, keepdim=True)
    return sample_top_p(logits / max(temperature, 1e-6), top_p, generator)


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
