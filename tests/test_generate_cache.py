"""Cached decoding (`arch.cache`, `HybridLM.forward_step`): step-by-step and prefill-then-step
logits equal the full forward at every position, and greedy decoding with the cache gives the
same tokens as full recomputation, for Mamba-1, Mamba-2, attention (RoPE or not, sliding
window, block sparse), MoE and momentum / Adam-style residual streams."""

from __future__ import annotations

import pytest
import torch

from arch import ModelConfig, build_model
from arch.cache import (
    CacheUnsupportedError,
    KVCache,
    MambaState,
    PerEvaluation,
    cache_unsupported_reason,
)
from arch.generate import generate
from arch.layers_registry import MIXERS, RESIDUALS
from arch.residual import ResidualUpdate

VOCAB, T = 100, 11
# The models run in float64: the cached path sums in another order than the full forward, which
# in fp32 differed by up to 6.7e-6 (the old 1e-5 left 1.5x) and could flip a near-tied greedy
# token on other kernels. float64: measured <= 2e-14 over 1/2 threads, default/avx2/avx512
# kernels and MKL_CBWR=COMPATIBLE; 1e-10 leaves > 1000x.
TOL = dict(rtol=0, atol=1e-10)


def tiny(pattern: str, **settings) -> ModelConfig:
    """A seeded-init model small enough for one CPU core; ``settings`` as "section.key": value."""
    cfg = ModelConfig(
        pattern=pattern, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, init_std=0.3
    )
    cfg.mamba2.head_dim, cfg.mamba2.d_state, cfg.mamba2.chunk_size = 16, 8, 4
    cfg.moe.num_experts = 4
    for key, value in settings.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


CASES = {
    "mamba1": ("M-", {}),
    "mamba2": ("S-", {}),
    "attn_rope": ("*-", {}),
    "attn_norope": ("*-", {"attention.rope": False}),
    "sliding_window_moe": ("*E", {"attention.name": "sliding_window", "attention.window": 3}),
    "block_sparse": (
        "*-",
        {"attention.name": "block_sparse", "attention.block_size": 2, "attention.stride": 2},
    ),
    "jamba_heavy_ball": ("M*SE", {"residual.name": "heavy_ball"}),
    "jamba_adam": ("M*SE", {"residual.name": "adam"}),
    "tmm": ("M*S-", {"residual.name": "tmm"}),
}


def ids_of(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def model(request):
    torch.set_num_threads(1)
    pattern, settings = CASES[request.param]
    return build_model(tiny(pattern, **settings), seed=0).double().eval()


@torch.no_grad()
def test_step_by_step_logits_equal_the_full_forward(model):
    ids = ids_of(2, T)
    full = model(ids)
    cache = model.new_cache()
    steps = torch.cat([model.forward_step(ids[:, i : i + 1], cache) for i in range(T)], dim=1)
    assert cache.position == T
    torch.testing.assert_close(steps, full, **TOL)


@torch.no_grad()
def test_prefill_then_steps_equal_the_full_forward(model):
    ids = ids_of(2, T, seed=1)
    full = model(ids)
    cache = model.new_cache()
    parts = [model.forward_step(ids[:, :5], cache), model.forward_step(ids[:, 5:7], cache)]
    parts += [model.forward_step(ids[:, i : i + 1], cache) for i in range(7, T)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)
    for layer, entry in zip(model.layers, cache.layers, strict=True):
        if isinstance(entry, KVCache) and layer.inner.cfg.name == "sliding_window":
            assert entry.k.shape[2] == layer.inner.cfg.window - 1  # only the window is kept
        if isinstance(entry, MambaState):
            assert entry.conv.shape[-1] == model.cfg.mamba.d_conv - 1


def test_cached_greedy_decode_equals_full_recompute(model):
    prompt = ids_of(2, 4, seed=2)
    cached = generate(model, prompt, 20, use_cache=True)
    full = generate(model, prompt, 20, use_cache=False)
    assert cached.shape == (2, 24)
    assert torch.equal(cached, full)
    assert len(cached[:, 4:].unique()) > 2  # the decode is not a constant token
    assert torch.equal(generate(model, prompt, 20), cached)  # the cache is the default


def test_cached_top_p_sampling_matches_full_recompute():
    model = build_model(tiny("M*S-"), seed=0).double().eval()  # float64: as the fixture
    prompt = ids_of(1, 3)

    def sample(use_cache: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        return generate(model, prompt, 10, top_p=0.9, generator=g, use_cache=use_cache)

    assert torch.equal(sample(True), sample(False))


def test_moe_with_a_capacity_falls_back_to_full_recompute():
    model = build_model(tiny("*E", **{"moe.capacity_factor": 1.0}), seed=0).eval()
    assert "sub-layer 1" in cache_unsupported_reason(model)
    with pytest.raises(CacheUnsupportedError, match="use_cache=False"):
        model.new_cache()
    prompt = ids_of(1, 4)
    assert torch.equal(generate(model, prompt, 5), generate(model, prompt, 5, use_cache=False))
    with pytest.raises(CacheUnsupportedError):
        generate(model, prompt, 5, use_cache=True)


class _NoStepMixer(torch.nn.Module):
    def __init__(self, cfg, layer_index):
        super().__init__()
        self.proj = torch.nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        return self.proj(x.cumsum(1))  # mixes tokens, and has no step


class _TwiceResidual(ResidualUpdate):
    def forward(self, state, oracle):
        x = state["x"]
        return {**state, "x": x + 0.5 * (oracle(x) + oracle(x + 0.1))}


def test_a_mixer_without_step_is_reported_and_generate_falls_back():
    MIXERS.add("_test_nostep", _NoStepMixer)
    try:
        cfg = tiny("A-")
        cfg.symbols = {"A": "_test_nostep"}
        model = build_model(cfg, seed=0).eval()
        assert "no step" in cache_unsupported_reason(model)
        prompt = ids_of(1, 3)
        assert generate(model, prompt, 3).shape == (1, 6)  # the full-recompute fallback
        with pytest.raises(CacheUnsupportedError, match="sub-layer 0"):
            generate(model, prompt, 3, use_cache=True)
    finally:  # registries are process-global: leave none behind
        MIXERS._items.pop("_test_nostep", None)


def test_a_residual_evaluating_each_mixer_twice_keeps_one_entry_per_evaluation():
    RESIDUALS.add("_test_twice", _TwiceResidual)
    try:
        twice = build_model(tiny("M*S-", **{"residual.name": "_test_twice"}), seed=0)
        twice = twice.double().eval()
        ids = ids_of(2, T)
        with torch.no_grad():
            full, cache = twice(ids), twice.new_cache()
            steps = [twice.forward_step(ids[:, :4], cache)]
            steps += [twice.forward_step(ids[:, i : i + 1], cache) for i in range(4, T)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
        assert isinstance(cache.layers[0], PerEvaluation) and len(cache.layers[0]) == 2
        prompt = ids_of(1, 3)
        assert torch.equal(generate(twice, prompt, 8), generate(twice, prompt, 8, use_cache=False))
    finally:
        RESIDUALS._items.pop("_test_twice", None)
