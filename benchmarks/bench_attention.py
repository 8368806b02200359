"""Attention kernel: SDPA (the default) vs the written-out eager reference, forward + backward.

    .venv/bin/python benchmarks/bench_attention.py [--seq-len 512] [--repeats 5]

Both kernels run in the same process on the same inputs, interleaved, so the ratio is
meaningful on a noisy machine; the absolute times are not. Prints a JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from arch.attention import eager_attention, sdpa_attention
from arch.config import AttentionConfig


def time_kernel(kernel, q, k, v, cfg, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        start = time.perf_counter()
        kernel(qq, kk, vv, cfg).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = AttentionConfig()
    for t in args.seq_len:
        q = torch.randn(args.batch, args.heads, t, args.head_dim)
        k = torch.randn(args.batch, args.kv_heads, t, args.head_dim)
        v = torch.randn(args.batch, args.kv_heads, t, args.head_dim)
        torch.testing.assert_close(
            sdpa_attention(q, k, v, cfg), eager_attention(q, k, v, cfg), atol=1e-4, rtol=1e-4
        )
        sdpa = time_kernel(sdpa_attention, q, k, v, cfg, args.repeats)
        eager = time_kernel(eager_attention, q, k, v, cfg, args.repeats)
        print(
            json.dumps(
                {
                    "seq_len": t,
                    "sdpa_ms": round(sdpa * 1e3, 2),
                    "eager_ms": round(eager * 1e3, 2),
                    "speedup_sdpa_over_eager": round(eager / sdpa, 2),
                    "threads": torch.get_num_threads(),
                }
            )
        )


if __name__ == "__main__":
    main()
