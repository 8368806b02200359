"""Mamba-1 selective scan on CPU: the custom-backward `cpu` scan vs the autograd-recorded loop.

    .venv/bin/python benchmarks/bench_mamba_scan.py [--seq-len 256 512] [--repeats 3]

Forward + backward of `arch.selective_scan.selective_scan` (softplus, D skip and gate included)
on the same inputs, interleaved in one process, so the ratio is meaningful on a noisy machine;
the absolute times are not. Prints a JSON line per sequence length. The loop's cost grows
faster than linearly with the length (its autograd graph has one node group per step): at 1024
it takes tens of seconds per repeat here.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from arch.selective_scan import selective_scan


def make_inputs(b: int, d: int, length: int, n: int) -> list[torch.Tensor]:
    u, delta, z = (torch.randn(b, d, length) for _ in range(3))
    A = -torch.exp(torch.randn(d, n) * 0.5)
    B, C = torch.randn(b, n, length), torch.randn(b, n, length)
    return [u, delta * 0.5, A, B, C, torch.randn(d), z, torch.randn(d) * 0.3 - 2]


def fwd_bwd(backend: str, inputs: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    leaves = [t.detach().requires_grad_() for t in inputs]
    u, delta, A, B, C, D, z, bias = leaves
    start = time.perf_counter()
    selective_scan(u, delta, A, B, C, D, z, delta_bias=bias, backend=backend).sum().backward()
    return time.perf_counter() - start, [t.grad for t in leaves]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-inner", type=int, default=128)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    for length in args.seq_len:
        inputs = make_inputs(args.batch, args.d_inner, length, args.d_state)
        best = {"cpu": float("inf"), "loop": float("inf")}
        for _ in range(args.repeats):
            for backend in best:
                seconds, grads = fwd_bwd(backend, inputs)
                best[backend] = min(best[backend], seconds)
                if backend == "cpu":
                    cpu_grads = grads
                else:  # same inputs, same answer: the comparison is of equals
                    err = max(
                        ((a - b).abs().max() / b.abs().max()).item()
                        for a, b in zip(cpu_grads, grads, strict=True)
                    )
        print(
            json.dumps(
                {
                    "seq_len": length,
                    "batch": args.batch,
                    "d_inner": args.d_inner,
                    "d_state": args.d_state,
                    "cpu_scan_ms": round(best["cpu"] * 1e3, 1),
                    "loop_ms": round(best["loop"] * 1e3, 1),
                    "speedup_cpu_over_loop": round(best["loop"] / best["cpu"], 2),
                    "max_rel_grad_diff": float(f"{err:.2e}"),
                    "threads": torch.get_num_threads(),
                }
            )
        )


if __name__ == "__main__":
    main()
