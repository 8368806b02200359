"""The cluster a plan is made for: GPU memory, peak compute and the two links between GPUs.

Presets carry the vendors' figures (dense bf16 without sparsity; one direction of a link);
`hybridtron plan --gpu` picks one, and explicit numbers override any field. The fractions of
these peaks that a step achieves are the time model's constants (`trainer.parallel.plan_time`),
not the hardware's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Hardware:
    """``gpus`` devices, ``gpus_per_node`` of them behind NVLink/NVSwitch, nodes joined by
    InfiniBand. Bandwidths in GB/s per GPU and direction; ``memory_gib`` what a device offers."""

    name: str
    gpus: int
    gpus_per_node: int
    memory_gib: float
    bf16_tflops: float
    hbm_gbs: float
    nvlink_gbs: float
    ib_gbs: float
    # Fixed cost of one collective / transfer (launch + synchronisation), seconds.
    link_latency_s: float = 10e-6
    # What the device runtime holds outside the tensor allocator (CUDA context, cuBLAS/NCCL
    # workspaces): not available to tensors. Measured on the H200 of benchmarks/gpu_check.py as
    # ~0.5 GiB for the context; NCCL adds its own buffers per communicator.
    runtime_reserved_gib: float = 1.0
    # Overrides of the time model's constants for this machine (None: plan_time's GPU values):
    # shares of peak by kind of work, and the chunked Mamba-1 scan's cost per state element.
    efficiency: tuple[tuple[str, float], ...] | None = None
    scan_s_per_state: float | None = None

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)

    def link(self, span: int) -> tuple[str, float]:
        """(name, GB/s) of the slowest link a group of ranks ``span`` global ranks wide crosses:
        NVLink when it fits in one node, else InfiniBand."""
        if span <= self.gpus_per_node:
            return "NVLink", self.nvlink_gbs
        return "IB", self.ib_gbs


# H100 / H200 SXM: 989 dense bf16 TFLOP/s, NVLink 4 at 900 GB/s both directions (450 one way),
# one 400 Gb/s NDR InfiniBand adapter per GPU (50 GB/s); HBM3 3.35 TB/s (H100), HBM3e 4.8 TB/s
# (H200). A100 SXM 80GB: 312 TFLOP/s, NVLink 3 at 300 GB/s one way, 200 Gb/s HDR (25 GB/s).
PRESETS: dict[str, Hardware] = {
    "h100": Hardware("H100-SXM-80GB", 8, 8, 80.0, 989.0, 3350.0, 450.0, 50.0),
    "h200": Hardware("H200-SXM-141GB", 8, 8, 141.0, 989.0, 4800.0, 450.0, 50.0),
    "a100": Hardware("A100-SXM-80GB", 8, 8, 80.0, 312.0, 2039.0, 300.0, 25.0),
}


def cpu_hardware(procs: int) -> Hardware:
    """This machine as ``procs`` single-threaded ranks over gloo, for benchmarks/plan_accuracy:
    the fp32 matmul rate of one thread (measured now, 512 x 512), shared when the ranks
    outnumber the cores; memory bandwidth from a 64 MiB copy; loopback gloo at a stated 1 GB/s
    and 100 us per collective (not measured); the sequential chunked scan at 11.5 ns per state
    element (bench_mamba_scan on this 2-core machine, T = 4096: ~0.77 s for 67M states)."""
    import os

    flops, copy = _cpu_rates()
    share = min(1.0, (os.cpu_count() or 1) / procs)
    return Hardware(
        name="cpu",
        gpus=procs,
        gpus_per_node=procs,
        memory_gib=1e6,
        bf16_tflops=2 * flops * share / 1e12,  # step_time takes fp32 as half the bf16 peak
        hbm_gbs=copy * share / 1e9,
        nvlink_gbs=1.0,
        ib_gbs=1.0,
        link_latency_s=100e-6,
        runtime_reserved_gib=0.0,
        efficiency=(
            ("matmul", 1.0),
            ("attention", 0.5),
            ("other", 0.3),
            ("hbm", 1.0),
            ("link", 1.0),
        ),
        scan_s_per_state=11.5e-9 / share,
    )


@functools.cache
def _cpu_rates() -> tuple[float, float]:
    """(fp32 FLOP/s of one thread's 512 x 512 matmul, bytes/s of a 64 MiB copy), best of 20,
    measured once per process so every layout is priced on the same figures."""
    import time

    import torch

    def best(fn, repeats: int = 20) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(512, 512)
        flops = 2 * 512**3 / best(lambda: a @ a)
        big = torch.empty(2**24)
        copy = 2 * big.numel() * 4 / best(lambda: big.clone())
    finally:
        torch.set_num_threads(threads)
    return flops, copy


def hardware(preset: str, gpus: int, gpus_per_node: int | None = None, **overrides) -> Hardware:
    """The preset for ``gpus`` devices, with any field overridden (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown GPU preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    fields = {k: v for k, v in overrides.items() if v is not None}
    per_node = gpus_per_node or base.gpus_per_node
    return replace(base, gpus=gpus, gpus_per_node=min(per_node, gpus), **fields)
