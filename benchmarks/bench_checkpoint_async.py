"""How long a checkpoint blocks training, synchronous vs `trainer.checkpoint_async`, for a ~100M
parameter model on CPU.

    .venv/bin/python benchmarks/bench_checkpoint_async.py [--d-model 768] [--repeats 3] [--out /tmp/ckpt-async]

One process (the model's weights and AdamW moments: ~1.2 GiB of checkpoint), as the Trainer
saves. Synchronous: training waits for the write (`TrainModule.save_state`) and the completion
(`finish_checkpoint`: every file hashed into the manifest, the rename). Asynchronous: training
waits for `prepare_save(copy=True)` (the host-memory snapshot); a thread then writes and hashes
what it wrote while training steps go on (timed against steps without a writer: the cost left on
shared cores); training waits again for the completion (the rename, the small shared files
hashed), which the Trainer runs once every rank's writer is done. Best of ``--repeats``. Last
line: ``async_blocked_ratio=X.XX`` (sync blocked time over async blocked time).
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import torch

warnings.simplefilter("ignore")


def build(d_model: int):
    from arch.config import ModelConfig
    from trainer.config import RunConfig
    from trainer.parallel.grid import Grid
    from trainer.train_module import SingleProcessTrainModule

    cfg = RunConfig()
    cfg.model = ModelConfig(
        pattern="*-" * 8, d_model=d_model, n_heads=12, vocab_size=32_000, tie_embeddings=False
    )
    cfg.trainer.seq_len, cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size = 128, 1, 1
    return cfg, SingleProcessTrainModule(cfg, Grid.one_process())


def main() -> None:
    from trainer import checkpoint as ckpt
    from trainer.checkpoint.background import BackgroundSave

    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/ckpt-async")
    args = parser.parse_args()
    out = Path(args.out)
    cfg, module = build(args.d_model)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 32_000, (1, 129), generator=g)]

    def step() -> float:
        start = time.perf_counter()
        module.train_step(batch, 1e-4)
        return time.perf_counter() - start

    step()  # the optimizer's moments exist from here on
    quiet = min(step() for _ in range(3))
    sync, snapshot, finish, written, during = [], [], [], [], []
    for i in range(args.repeats):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()  # synchronous: write, hash into the manifest, rename
        tmp = ckpt.begin_checkpoint(out / "sync", i)
        module.save_state(tmp)
        ckpt.finish_checkpoint(out / "sync", i)
        sync.append(time.perf_counter() - start)
        start = time.perf_counter()  # asynchronous: the snapshot blocks ...
        tmp = ckpt.begin_checkpoint(out / "async", i)
        write = module.prepare_save(copy=True)
        snapshot.append(time.perf_counter() - start)
        begun = time.perf_counter()
        save = BackgroundSave(i, tmp, lambda write=write, tmp=tmp: write(tmp))
        steps = []
        while save.writing():  # ... training goes on while the thread writes ...
            steps.append(step())
        save.result()
        written.append(time.perf_counter() - begun)
        during += steps
        start = time.perf_counter()  # ... and completing it (hashes, rename) blocks again
        ckpt.finish_checkpoint(out / "async", i, None, save.hashes)
        finish.append(time.perf_counter() - start)
    done = out / "sync" / ckpt.step_dir_name(args.repeats - 1)
    size = sum(f.stat().st_size for f in done.iterdir()) / 2**20
    params = sum(p.numel() for p in module.model.parameters()) / 1e6
    blocked = min(a + b for a, b in zip(snapshot, finish, strict=True))
    print(f"model: {params:.1f}M parameters; checkpoint {size:,.0f} MiB")
    print("| save | training blocked (s) |")
    print("|---|---:|")
    print(f"| synchronous (write + manifest hashes + rename) | {min(sync):.3f} |")
    print(f"| asynchronous: host snapshot | {min(snapshot):.3f} |")
    print(f"| asynchronous: completing (manifest hashes + rename) | {min(finish):.3f} |")
    mean_during = sum(during) / len(during) if during else float("nan")
    print(
        f"background write {min(written):.2f} s; {len(during)} steps meanwhile at "
        f"{mean_during * 1e3:.0f} ms vs {quiet * 1e3:.0f} ms without a writer"
    )
    print(f"async_blocked_ratio={min(sync) / blocked:.2f}")


if __name__ == "__main__":
    main()
