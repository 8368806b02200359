"""Mamba-1 selective scan on CPU (or one GPU): fwd+bwd time and peak memory of the scan back-ends.

    .venv/bin/python benchmarks/bench_mamba_scan.py [--seq-len 256 1024 4096]
        [--backends cpu chunked chunked:parallel] [--repeats 3] [--memory-seq-len 4096]
        [--device cpu|cuda] [--parallel-chunk Q]

A back-end is a `model.mamba.scan` name, or ``chunked:<strategy>`` for the `chunked` scan with
an explicit in-chunk strategy (``sequential``, ``parallel``; plain ``chunked`` picks by device:
sequential on CPU). ``--parallel-chunk`` overrides the parallel strategy's Q
(`arch.selective_scan_chunked.PARALLEL_CHUNK`). ``--device cuda`` times on the GPU (synchronised,
same inputs; peak memory is skipped there).

Forward + backward of `arch.selective_scan.selective_scan` (softplus, D skip and gate included)
on the same inputs, back-ends interleaved in one process, so the ratios are meaningful on a noisy
machine; the absolute times are not. Prints a JSON line per sequence length (best of
``--repeats`` wall times, each back-end's speed-up over the first one, and the parallel chunked
strategy's over the sequential one when both run), then one per back-end
with the peak memory of one fwd+bwd at ``--memory-seq-len``.

Peak memory: tracemalloc sees only Python's allocator and torch.cuda's counters exist only on
CUDA, so each case runs in a fresh subprocess (nothing cached by an earlier case) that builds the
inputs, resets the kernel's peak-RSS mark, runs one fwd+bwd and reports how far the peak resident
set (VmHWM) rose above the RSS before it: what the scan and its backward held at their peak
(the inputs' gradients included, the same for every back-end). Linux only. The `loop` back-end (``--backends loop``) is the autograd-recorded
reference: tens of seconds per repeat at 1024.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import arch.selective_scan_chunked
from arch.selective_scan import selective_scan

REPO = Path(__file__).resolve().parent.parent


def make_inputs(b: int, d: int, length: int, n: int, device: str = "cpu") -> list[torch.Tensor]:
    u, delta, z = (torch.randn(b, d, length) for _ in range(3))
    A = -torch.exp(torch.randn(d, n) * 0.5)
    B, C = torch.randn(b, n, length), torch.randn(b, n, length)
    inputs = [u, delta * 0.5, A, B, C, torch.randn(d), z, torch.randn(d) * 0.3 - 2]
    return [t.to(device) for t in inputs]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(backend: str, inputs: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """Wall time of one fwd+bwd of ``backend`` (``chunked:<strategy>``: that strategy)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    u, delta, A, B, C, D, z, bias = leaves
    name, _, strategy = backend.partition(":")
    _synchronize(u.device)
    start = time.perf_counter()
    y = selective_scan(
        u, delta, A, B, C, D, z, delta_bias=bias, backend=name, chunked_strategy=strategy or None
    )
    y.sum().backward()
    _synchronize(u.device)
    return time.perf_counter() - start, [t.grad for t in leaves]


def max_rel_diff(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, reference, strict=True)
    )


def time_backends(args: argparse.Namespace, length: int) -> dict:
    """Best-of-repeats fwd+bwd wall time per back-end, interleaved, and the gradients' agreement."""
    inputs = make_inputs(args.batch, args.d_inner, length, args.d_state, args.device)
    best = dict.fromkeys(args.backends, float("inf"))
    err = 0.0
    for _ in range(args.repeats):
        grads = {}
        for backend in args.backends:
            seconds, grads[backend] = fwd_bwd(backend, inputs)
            best[backend] = min(best[backend], seconds)
        first = grads[args.backends[0]]
        err = max([err] + [max_rel_diff(g, first) for g in grads.values()])
    base = args.backends[0]
    row = {"seq_len": length, **{f"{k}_ms": round(v * 1e3, 1) for k, v in best.items()}}
    row |= {f"speedup_{k}_over_{base}": round(best[base] / best[k], 2) for k in args.backends[1:]}
    sequential = "chunked:sequential" if "chunked:sequential" in best else None
    if sequential is None and args.device == "cpu" and "chunked" in best:
        sequential = "chunked"  # plain `chunked` is the sequential strategy on CPU
    if sequential and "chunked:parallel" in best:
        row["speedup_parallel_over_sequential"] = round(
            best[sequential] / best["chunked:parallel"], 2
        )
    return row | {"max_rel_grad_diff": float(f"{err:.2e}")}


def _status_kib(key: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_memory_case(backend: str, args: argparse.Namespace) -> None:
    """(In the fresh subprocess.) One fwd+bwd; prints how far the peak RSS rose above the RSS
    before it, in MiB. The peak is reset first (writing 5 to /proc/self/clear_refs): a plain
    ru_maxrss still holds the transient peak of importing torch, which hid a small scan's peak."""
    inputs = make_inputs(args.batch, args.d_inner, args.memory_seq_len, args.d_state)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fwd_bwd(backend, inputs)
    print(json.dumps({"peak_rss_rise_mib": round((_status_kib("VmHWM") - before) / 1024, 1)}))


def peak_memory(backend: str, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--memory-case", backend]
    command += ["--batch", str(args.batch), "--d-inner", str(args.d_inner)]
    command += ["--d-state", str(args.d_state), "--memory-seq-len", str(args.memory_seq_len)]
    if args.parallel_chunk:
        command += ["--parallel-chunk", str(args.parallel_chunk)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_rise_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--backends", nargs="+", default=["cpu", "chunked", "chunked:parallel"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-inner", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-seq-len", type=int, default=4096, help="0: skip")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--parallel-chunk", type=int, help="Q of the parallel strategy")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)  # the subprocess's back-end
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.parallel_chunk:
        arch.selective_scan_chunked.PARALLEL_CHUNK = args.parallel_chunk
    if args.memory_case:
        peak_memory_case(args.memory_case, args)
        return
    shape = {"batch": args.batch, "d_inner": args.d_inner, "d_state": args.d_state}
    machine = {"threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    if args.device == "cuda":
        machine = {"device": torch.cuda.get_device_name(0)}
    machine["parallel_chunk"] = arch.selective_scan_chunked.PARALLEL_CHUNK
    for length in args.seq_len:
        print(json.dumps(time_backends(args, length) | shape | machine), flush=True)
    if args.memory_seq_len and args.device == "cpu":
        for backend in args.backends:
            mib = peak_memory(backend, args)
            row = {"backend": backend, "seq_len": args.memory_seq_len, "peak_rss_rise_mib": mib}
            print(json.dumps(row | shape), flush=True)


if __name__ == "__main__":
    main()
