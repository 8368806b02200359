"""Checkpoint save under ZeRO-2 at dp 4: every rank writes what it holds (format 2, DCP) against
gathering every ZeRO partition and writing dense tensors from rank 0 (the previous format).

    .venv/bin/python benchmarks/bench_checkpoint_sharded.py [--d-model 768] [--repeats 2] [--out /tmp/ckpt-sharded]

The script launches itself under ``torch.distributed.run`` (4 gloo ranks, ``OMP_NUM_THREADS=1``):
layout dp 4 x tp 1 x pp 1, ``parallel.zero_stage=2``, model pattern ``*-*-*-*-`` (4 attention
and 4 SwiGLU MLP sub-layers), head_dim 64, vocabulary 32,000, untied head, fp32, AdamW; one
training step first so the moments exist. The two saves:

- ``sharded``: ``module.prepare_save(copy=False)(dir)`` -- each rank writes its ZeRO-2
  fragments of the fp32 master and moments with torch.distributed.checkpoint, no gather;
- ``gather``: ``module._link_optimizer_state()``, then for every parameter DeepSpeed's
  ``safe_get_full_fp32_param`` and ``safe_get_full_optimizer_state`` (exp_avg, exp_avg_sq) on
  every rank (all-reduces over the data-parallel group); rank 0 keeps them and writes two
  safetensors files with ``save_file`` and fsyncs them (the DCP writer fsyncs too:
  ``sync_files=True``); the other ranks keep none past the next parameter. Every rank writes its
  RNG file in both.

Two launches (fresh processes), each ``--repeats`` rounds of both saves interleaved (so both see
the same load on shared cores): the first launch starts with ``sharded``, the second with
``gather``. Time: a barrier, then each rank times its own save; the figure is the slowest rank's
(max over ranks), best of every save of that method (2 x ``--repeats``). Bytes: the sizes of the
files each rank wrote. Memory: a thread samples the rank's resident set (psutil RSS) every 2 ms
during the save; the figure is the peak minus the RSS just before it, taken from the method's
first save in a fresh process only (later saves reuse heap the earlier ones freed;
``ru_maxrss`` cannot be used: the training step's peak is higher than either save's). Last
line: ``sharded_save_speedup=X.XX`` (gather time over sharded time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import psutil

warnings.simplefilter("ignore")
ROOT = Path(__file__).resolve().parent.parent
PATTERN = "*-" * 4
VOCAB, SEQ, WORLD = 32_000, 128, 4
METHODS = ("sharded", "gather")


def run_config(d_model: int):
    from arch.config import ModelConfig
    from trainer.config import RunConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(
        pattern=PATTERN,
        d_model=d_model,
        n_heads=d_model // 64,
        vocab_size=VOCAB,
        tie_embeddings=False,
    )
    cfg.trainer.seq_len, cfg.trainer.micro_batch_size = SEQ, 1
    cfg.trainer.global_batch_size, cfg.trainer.seed = WORLD, 0
    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage = 1, 1, 2
    return cfg


class PeakRss:
    """The resident set's peak growth over its value at the start, sampled by a thread."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.process, self.every_s = psutil.Process(), every_s
        self.stop_event = threading.Event()

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop_event.wait(self.every_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def gather_save(module, directory: Path, rank: int) -> list[str]:
    """The previous format's way: every ZeRO partition gathered (on every rank), rank 0 writes
    the dense fp32 weights and moments."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    from trainer.checkpoint.format import rng_file
    from trainer.rng import rng_state

    module._link_optimizer_state()
    keys, step = module._state_keys()
    weights, moments = {}, {}
    for name, p in module.stage.model.named_parameters():
        full = safe_get_full_fp32_param(p)
        state = {k: safe_get_full_optimizer_state(p, k) for k in keys}
        if rank == 0:  # the other ranks drop theirs at once
            weights[name] = full.detach().float().contiguous()
            moments.update({f"{name}.{k}": t.contiguous() for k, t in state.items()})
    for name, b in module._buffers().items():
        if rank == 0:
            weights[name] = b.detach().float().contiguous()
    written = []
    if rank == 0:
        for file, tensors, meta in (
            ("shard.safetensors", weights, None),
            ("optim.safetensors", moments, {"step": str(step)}),
        ):
            save_file(tensors, directory / file, metadata=meta)
            fd = os.open(directory / file, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            written.append(file)
    torch.save(rng_state(), directory / rng_file(rank))
    return [*written, rng_file(rank)]


def save(module, grid, method: str, root: Path, repeat: int, args) -> None:
    """One timed save by ``method`` into a fresh directory; rank 0 appends every rank's
    figures to ``--report`` (``fresh``: this process's first save, whose memory counts)."""
    import torch.distributed as dist

    directory = root / f"repeat{repeat}"
    if grid.rank == 0:
        shutil.rmtree(Path(args.out) / "sharded", ignore_errors=True)  # one on disk at a time
        shutil.rmtree(Path(args.out) / "gather", ignore_errors=True)
        directory.mkdir(parents=True)
    dist.barrier()
    with PeakRss() as memory:
        start = time.perf_counter()
        if method == "sharded":
            files = module.prepare_save(copy=False)(directory)
        else:
            files = gather_save(module, directory, grid.rank)
        elapsed = time.perf_counter() - start
    dist.barrier()
    mine = {
        "seconds": elapsed,
        "bytes": sum((directory / f).stat().st_size for f in files),
        "rss_growth": memory.growth,
        "rss_before": memory.start,
    }
    ranks = [None] * grid.world
    dist.all_gather_object(ranks, mine)
    if grid.rank == 0:
        fresh = repeat == 0 and method == args.first
        record = {"method": method, "repeat": repeat, "fresh": fresh, "ranks": ranks}
        record["params"] = sum(p.numel() for p in module.stage.model.parameters())
        with open(args.report, "a") as f:
            f.write(json.dumps(record) + "\n")


def worker(args: argparse.Namespace) -> None:
    """One rank of one launch: build, one step, then ``--repeats`` rounds of both saves,
    ``--first``'s first (its first save is this process's first: the one whose memory counts)."""
    import torch
    import torch.distributed as dist

    from trainer.parallel.grid import init_grid
    from trainer.parallel.train_module import ParallelTrainModule

    grid = init_grid(1, 1, timeout_s=600)
    module = ParallelTrainModule(run_config(args.d_model), grid)
    g = torch.Generator().manual_seed(grid.dp_rank)
    module.train_step([torch.randint(0, VOCAB, (1, SEQ + 1), generator=g)], 1e-4)
    order = [args.first, *(m for m in METHODS if m != args.first)]
    for i in range(args.repeats):
        for method in order:  # interleaved: both methods see the same load
            save(module, grid, method, Path(args.out) / method, i, args)
    dist.barrier()
    dist.destroy_process_group()


def launch(args: argparse.Namespace, first: str, report: Path) -> None:
    from launch.spawn import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}"]
    cmd += ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    cmd += [str(Path(__file__).resolve()), "--first", first, "--report", str(report)]
    cmd += ["--d-model", str(args.d_model), "--repeats", str(args.repeats), "--out", args.out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="/tmp/ckpt-sharded")
    parser.add_argument("--first", choices=METHODS)  # set when launched as a rank
    parser.add_argument("--report")
    args = parser.parse_args()
    if args.first:
        return worker(args)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report = out / "report.jsonl"
    for first in METHODS:
        launch(args, first, report)
    records = [json.loads(line) for line in report.read_text().splitlines()]
    shutil.rmtree(out / "sharded", ignore_errors=True)
    shutil.rmtree(out / "gather", ignore_errors=True)
    mib = 2**20
    rows = {}
    for method in METHODS:
        mine = [r["ranks"] for r in records if r["method"] == method]
        (fresh,) = [r["ranks"] for r in records if r["method"] == method and r["fresh"]]
        rows[method] = {
            "seconds": min(max(rank["seconds"] for rank in ranks) for ranks in mine),
            "times": len(mine),
            "bytes": [rank["bytes"] / mib for rank in mine[-1]],
            "rank0_growth": fresh[0]["rss_growth"] / mib,
            "max_growth": max(rank["rss_growth"] for rank in fresh) / mib,
            "rank0_before": fresh[0]["rss_before"] / mib,
        }
    params = records[0]["params"] / 1e6
    print(f"model: {params:.1f}M parameters, pattern {PATTERN}, d_model {args.d_model}")
    times = rows["sharded"]["times"]
    print(f"layout: dp {WORLD} x tp 1 x pp 1, ZeRO-2, gloo; time: best of {times} saves each")
    print(
        "| save | slowest rank (s) | MiB written per rank (0/1/2/3) "
        "| rank-0 peak RSS growth (MiB) | largest rank's growth (MiB) |"
    )
    print("|---|---:|---|---:|---:|")
    names = {"sharded": "sharded (DCP, each rank its part)", "gather": "gather to rank 0 + dense"}
    for method, row in rows.items():
        written = " / ".join(f"{b:,.0f}" for b in row["bytes"])
        print(
            f"| {names[method]} | {row['seconds']:.2f} | {written} "
            f"| {row['rank0_growth']:,.0f} | {row['max_growth']:,.0f} |"
        )
    print(
        f"rank-0 RSS before the save: sharded {rows['sharded']['rank0_before']:,.0f} MiB, "
        f"gather {rows['gather']['rank0_before']:,.0f} MiB"
    )
    print(f"sharded_save_speedup={rows['gather']['seconds'] / rows['sharded']['seconds']:.2f}")


if __name__ == "__main__":
    main()
