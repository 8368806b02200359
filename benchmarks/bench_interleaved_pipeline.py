"""Interleaved 1F1B vs plain 1F1B: step time of the same pp 2 model with 1, 2 and 4 virtual stages.

    .venv/bin/python benchmarks/bench_interleaved_pipeline.py [--steps 6] [--micro-batches 4] \
        [--d-model 256] [--seq 256]

Starts 2 ranks (torchrun, gloo, one thread each) that build the same model (pattern
``*M-E*-*M-E*-``, 12 sub-layers, so up to 6 chunks per rank) once per virtual-stage count, then
take the steps round-robin over the counts (so load from other work hits them alike) and keep
each count's median step time. Every count must give the same losses (checked, 1e-5). Prints one
JSON line per count: step ms, the bubble fraction the schedule logs (`pipeline/bubble`), and
the time saved against v = 1. With the same compute, a step takes 1 / (1 - bubble) of it, so
the bubble alone predicts v = 2 and 4 to save 1 - 0.8 / 0.889 = 10% and 1 - 0.8 / 0.941 = 15%
at m = 4; each extra chunk adds a transfer per micro-batch and its Python overhead, so where a
chunk's compute is small (``--d-model 128 --seq 128`` here) interleaving costs more than it saves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VIRTUAL = (1, 2, 4)  # 12 sub-layers: 2 x 4 = 8 chunks at most here


def worker(steps: int, micro_batches: int, d_model: int, seq: int) -> None:
    warnings.simplefilter("ignore")
    import torch

    from arch.config import ModelConfig
    from trainer.config import RunConfig
    from trainer.parallel.grid import init_grid
    from trainer.parallel.train_module import ParallelTrainModule

    grid = init_grid(1, 2, timeout_s=600)
    micro = 2
    modules = {}
    for v in VIRTUAL:
        cfg = RunConfig()
        cfg.model = ModelConfig(pattern="*M-E*-" * 2, d_model=d_model, n_heads=4, n_kv_heads=2)
        cfg.model.moe.num_experts = 4
        cfg.trainer.micro_batch_size = micro
        cfg.trainer.global_batch_size = micro * micro_batches
        cfg.trainer.seq_len = seq
        cfg.parallel.pipeline, cfg.parallel.virtual_stages = 2, v
        modules[v] = ParallelTrainModule(cfg, grid)
    g = torch.Generator().manual_seed(0)
    vocab = modules[1].cfg.model.vocab_size
    batches = [
        [torch.randint(0, vocab, (micro, seq + 1), generator=g) for _ in range(micro_batches)]
        for _ in range(steps + 1)
    ]
    times: dict[int, list[float]] = {v: [] for v in VIRTUAL}
    losses: dict[int, list[float]] = {v: [] for v in VIRTUAL}
    bubble: dict[int, float] = {}
    for step, batch in enumerate(batches):
        for v, module in modules.items():
            grid.barrier()
            start = time.perf_counter()
            out = module.train_step(batch, 1e-3)
            grid.barrier()
            if step:  # the first step warms up (allocations, DeepSpeed's first boundary)
                times[v].append(time.perf_counter() - start)
            losses[v].append(out.loss)
            bubble[v] = out.metrics["pipeline/bubble"]
    for v in VIRTUAL:
        for a, b in zip(losses[v], losses[1], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (v, losses[v], losses[1])
    if grid.rank == 0:
        base = statistics.median(times[1])
        for v in VIRTUAL:
            ms = statistics.median(times[v]) * 1e3
            print(
                json.dumps(
                    {
                        "virtual_stages": v,
                        "pp": 2,
                        "micro_batches": micro_batches,
                        "step_ms": round(ms, 1),
                        "bubble": round(bubble[v], 4),
                        "saved_vs_1f1b": round(1 - ms / (base * 1e3), 3),
                    }
                ),
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.micro_batches, args.d_model, args.seq)
        return
    from launch.spawn import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        __file__,
        "--worker",
        *sys.argv[1:],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


if __name__ == "__main__":
    main()
