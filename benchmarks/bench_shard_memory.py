"""Peak resident memory per rank of a ~200M-parameter hybrid: tp 2 x pp 2 (4 gloo ranks) against
one process, over build + first step + checkpoint save, then resume (build from the checkpoint)
+ one step, each phase in fresh processes.

    .venv/bin/python benchmarks/bench_shard_memory.py [--d-model 1024] [--out /tmp/shard-mem]

The model: pattern ``M-*-M-E-|M-*-M-E-`` (Mamba, attention, SwiGLU MLP, 4-expert MoE; 16
sub-layers), d_model 1024, vocabulary 32,000, untied head, fp32, AdamW, no ZeRO (dp 1: the default); sequence
128, micro-batch 1, 2 micro-batches a step. Each process reports ``ru_maxrss`` (its peak resident
set) and its resident set after the imports (the floor every process pays: torch, Megatron,
DeepSpeed). The last line is ``shard_memory_ratio=X.XX``: the largest rank's peak over the one
process's peak (each the larger of its two phases); the target is <= 0.35.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import psutil

warnings.simplefilter("ignore")
ROOT = Path(__file__).resolve().parent.parent
PATTERN = "M-*-M-E-|M-*-M-E-"
SEQ, MICRO, GLOBAL = 128, 1, 2


def run_config(d_model: int, tp: int, pp: int):
    from arch.config import ModelConfig, MoEConfig
    from trainer.config import RunConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(
        pattern=PATTERN,
        d_model=d_model,
        n_heads=16,
        n_kv_heads=8,
        vocab_size=32_000,
        tie_embeddings=False,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=d_model),
    )
    cfg.trainer.seq_len, cfg.trainer.micro_batch_size = SEQ, MICRO
    cfg.trainer.global_batch_size, cfg.trainer.seed = GLOBAL, 0
    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage = tp, pp, 0
    return cfg


def peak_mib() -> float:
    """This process's peak resident set so far (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(args: argparse.Namespace) -> None:
    """One process of one phase (``--phase train`` or ``resume``), as a rank under torchrun or
    alone; appends {"rank", "phase", "peak_mib", "floor_mib"} to ``--report``."""
    import torch
    import torch.distributed as dist

    from arch import count_parameters  # noqa: F401  (the imports are the floor)
    from trainer import checkpoint as ckpt
    from trainer.checkpoint.format import tmp_dir
    from trainer.loop import config_yaml
    from trainer.parallel.grid import Grid, init_grid
    from trainer.parallel.train_module import ParallelTrainModule
    from trainer.train_module import SingleProcessTrainModule

    floor = psutil.Process().memory_info().rss
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = (2, 2) if world > 1 else (1, 1)
    cfg = run_config(args.d_model, tp, pp)
    grid = init_grid(tp, pp, timeout_s=1800) if world > 1 else Grid.one_process()
    checkpoints = Path(args.out) / f"checkpoints-world{world}"
    resume = ckpt.resolve_checkpoint(checkpoints) if args.phase == "resume" else None
    kind = ParallelTrainModule if world > 1 else SingleProcessTrainModule
    module = kind(cfg, grid, resume)
    built = peak_mib()
    g = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, 32_000, (MICRO, SEQ + 1), generator=g) for _ in range(GLOBAL)]
    result = module.train_step(micro, 1e-4)
    stepped = peak_mib()
    if args.phase == "train":
        if grid.rank == 0:
            ckpt.begin_checkpoint(checkpoints, 1)
        if world > 1:
            dist.barrier()
        tmp = tmp_dir(checkpoints, 1)
        module.save_state(tmp)
        if world > 1:
            dist.barrier()
        if grid.rank == 0:
            ckpt.write_shared(tmp, {"step": 1, "tokens": 0}, config_yaml(cfg))
            ckpt.finish_checkpoint(checkpoints, 1, module.checkpoint_layout)
    record = {
        "rank": grid.rank,
        "phase": args.phase,
        "peak_mib": peak_mib(),
        "floor_mib": floor / 2**20,
        "built_mib": built,  # peak so far after the build (and the engine, the resume load)
        "stepped_mib": stepped,  # ... and after the first step
        "loss": result.loss,
        "params": module.num_params,
    }
    with open(args.report, "a") as f:
        f.write(json.dumps(record) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch(args: argparse.Namespace, world: int, name: str, report: Path) -> None:
    script = [str(Path(__file__).resolve()), "--phase", name, "--report", str(report)]
    script += ["--d-model", str(args.d_model), "--out", args.out]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        from launch.spawn import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}"]
        cmd += ["--master-addr=127.0.0.1", f"--master-port={free_port()}", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--out", default="/tmp/shard-mem")
    parser.add_argument("--phase", choices=["train", "resume"])
    parser.add_argument("--report")
    args = parser.parse_args()
    if args.phase:
        return phase(args)
    out = Path(args.out)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    report = out / "report.jsonl"
    for world in (1, 4):
        for name in ("train", "resume"):
            launch(args, world, name, report)
    records = [json.loads(line) for line in report.read_text().splitlines()]
    one, ranks = records[:2], records[2:]  # one process (train, resume), then the 4 ranks
    print(f"model: {records[0]['params'] / 1e6:.1f}M parameters, pattern {PATTERN}")
    print("| process | phase | after imports | peak after build | after step | peak (MiB) |")
    print("|---|---|---|---|---|---|")
    for r, who in [(r, "one process") for r in one] + [(r, f"rank {r['rank']}") for r in ranks]:
        figures = [r[k] for k in ("floor_mib", "built_mib", "stepped_mib", "peak_mib")]
        print(f"| {who} | {r['phase']} | " + " | ".join(f"{x:.0f}" for x in figures) + " |")
    one_peak = max(r["peak_mib"] for r in one)
    rank_peak = max(r["peak_mib"] for r in ranks)
    losses = {r["loss"] for r in records if r["phase"] == "train" and r["loss"] == r["loss"]}
    print(f"step-1 losses (one process and the last stage): {sorted(losses)}")
    print(f"shard_memory_ratio={rank_peak / one_peak:.2f}")


if __name__ == "__main__":
    main()
