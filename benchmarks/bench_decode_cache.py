"""Greedy decoding with the inference cache vs full recomputation, on a tiny Jamba-like model.

    .venv/bin/python benchmarks/bench_decode_cache.py [--prompt-len 32] [--new-tokens 64]

Pattern ``M-ME*-ME`` (Mamba-1, MLP, MoE, one attention sub-layer, no RoPE as in Jamba), random
seeded weights, batch 1, fp32 on CPU with one thread. Both decodes run in one process on the
same prompt (interleaved repeats, best time kept) and must produce the same tokens. Prints
tokens/s of each and, as the last line, ``speedup_cached_decode=X.XX`` (cached / full). The
absolute rates depend on the machine; the ratio grows with the sequence length, since full
recomputation costs O(T) per token (the Mamba scan) and O(T^2) in total.
"""

from __future__ import annotations

import argparse
import time

import torch

from arch import ModelConfig, build_model
from arch.generate import generate


def jamba_like() -> ModelConfig:
    cfg = ModelConfig(
        pattern="M-ME*-ME", d_model=64, n_heads=4, n_kv_heads=2, vocab_size=512, init_std=0.1
    )
    cfg.attention.rope = False
    cfg.moe.num_experts, cfg.moe.top_k = 4, 2
    return cfg


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(jamba_like(), seed=0).eval()
    prompt = torch.randint(0, 512, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    best = {"cached": float("inf"), "full": float("inf")}
    outs = {}
    for _ in range(args.repeats):
        for name, use_cache in (("cached", True), ("full", False)):
            seconds, outs[name] = timed(lambda u=use_cache: generate(model, prompt, n, use_cache=u))
            best[name] = min(best[name], seconds)
    assert torch.equal(outs["cached"], outs["full"]), "cached decode differs from full recompute"
    print(
        f"model pattern={model.cfg.pattern} d_model={model.cfg.d_model} batch=1 fp32 cpu 1 thread"
    )
    print(f"prompt_len={args.prompt_len} new_tokens={n} identical_tokens=True")
    for name in ("full", "cached"):
        print(f"{name}: {n / best[name]:.1f} tokens/s ({best[name]:.3f} s)")
    print(f"speedup_cached_decode={best['full'] / best['cached']:.2f}")


if __name__ == "__main__":
    main()
