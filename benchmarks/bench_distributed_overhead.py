"""What the distributed path costs at equal compute: one optimizer step of the same model through
the plain TrainModule and through the ParallelTrainModule (the 1F1B schedule, Megatron groups and
the engine: at world 1 the plain one, ZeRO having nothing to partition) in a world of one
process, interleaved, best of N.

    .venv/bin/python benchmarks/bench_distributed_overhead.py [--steps 8] [--d-model 256]

Both modules see the same micro-batches and must report the same losses (checked). The last line
is ``distributed_step_time_ratio=X.XX`` (parallel / plain; 1.00 means free). On GPU run it on one
device the same way; with several ranks the comparison is against their communication as well.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

warnings.simplefilter("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    from launch.spawn import free_port

    os.environ["MASTER_PORT"] = str(free_port())

    from arch.config import ModelConfig
    from trainer.config import RunConfig
    from trainer.parallel.grid import Grid, init_grid
    from trainer.parallel.train_module import ParallelTrainModule
    from trainer.train_module import SingleProcessTrainModule

    cfg = RunConfig()
    cfg.model = ModelConfig(pattern="*M-E*-", d_model=args.d_model, n_heads=8, n_kv_heads=4)
    cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = 4, 8
    cfg.trainer.seq_len = args.seq
    grid = init_grid(1, 1, timeout_s=600)
    plain = SingleProcessTrainModule(cfg, Grid.one_process())
    parallel = ParallelTrainModule(cfg, grid)  # 2 micro-batches a step, as the plain one
    g = torch.Generator().manual_seed(0)
    batches = [
        [torch.randint(0, cfg.model.vocab_size, (4, args.seq + 1), generator=g) for _ in range(2)]
        for _ in range(args.steps)
    ]
    times: dict[str, list[float]] = {"plain": [], "parallel": []}
    for step, micro in enumerate(batches):
        losses = {}
        for name, module in (("plain", plain), ("parallel", parallel)):
            start = time.perf_counter()
            losses[name] = module.train_step(micro, 1e-3).loss
            times[name].append(time.perf_counter() - start)
        rel = abs(losses["plain"] - losses["parallel"]) / losses["plain"]
        assert rel < 1e-5, (step, losses)
    best = {k: min(v[1:]) for k, v in times.items()}  # the first step warms up both
    tokens = 8 * args.seq
    print(f"model {cfg.model.pattern} d_model {args.d_model}, {tokens} tokens per step, fp32 CPU")
    for name, t in best.items():
        print(f"{name:9s} {t * 1e3:8.1f} ms/step  {tokens / t:9.0f} tokens/s")
    print(f"distributed_step_time_ratio={best['parallel'] / best['plain']:.2f}")


if __name__ == "__main__":
    main()
