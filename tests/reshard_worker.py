"""One rank of the 8-rank launch (tests/test_checkpoint_reshard.py): the layout-equivalence cases
that need 8 ranks (``EIGHT_RANK_LAYOUTS`` of tests/test_parallel_equivalence.py, run as
tests/parallel_worker.py runs them), then the any-layout checkpoint cases.

Every rank writes what it holds (format 2, no gather) and any layout reads it back. In one process
group (start-up dominates on 2 cores), on the same global batches:

1. tp 2 x pp 2 x dp 2, ZeRO-2, sequence parallel trains 6 steps (the reference), checkpoint at 2;
2. the same layout resumed from step 2: steps 3-4;
3. tp 1 x pp 2 x dp 4, ZeRO-2, experts over ep 2, 2 virtual stages, from step 2: steps 3-6,
   checkpoint at 4; then the reference layout back from that: steps 5-6 (to compare with this
   run's own 5-6: its steps 3-4 took other reduction orders than the reference's);
4. tp 2 x dp 4 under ZeRO-3 from step 2: steps 3-4, checkpoint at 4; the reference layout back
   from that: steps 5-6;
5. one process (rank 0) from step 2: steps 3-4, checkpoint at 4; the reference layout back from
   that: steps 5-6.

    torchrun --nproc-per-node 8 tests/reshard_worker.py OUT.json CHECKPOINTS_DIR LAYOUTS_JSON
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

warnings.simplefilter("ignore")

from tests.parallel_worker import (  # noqa: E402
    MICRO,
    micro_batches,
    run_config,
    run_layouts,
    watchdog,
)
from trainer.checkpoint import verify_checkpoint  # noqa: E402
from trainer.checkpoint.format import tmp_dir  # noqa: E402
from trainer.checkpoint.writer import begin_checkpoint, finish_checkpoint, write_shared  # noqa: E402
from trainer.parallel.grid import Grid, init_grid  # noqa: E402
from trainer.parallel.train_module import ParallelTrainModule  # noqa: E402
from trainer.train_module import SingleProcessTrainModule  # noqa: E402

LR = 3e-3
PATTERN = "*M-E*-"  # attention, Mamba, MLP, MoE: 6 layers, 4 chunks at pp 2 x 2 virtual stages


def batches():
    import torch

    from tests.parallel_worker import GLOBAL, SEQ, VOCAB

    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g) for _ in range(6)]


LAYOUTS = {
    "reference": {"tp": 2, "pp": 2, "zero": 2, "parallel": {"sequence_parallel": True}},
    "tp1 pp2 dp4 ep2 v2": {
        "tp": 1,
        "pp": 2,
        "zero": 2,
        "parallel": {"expert": 2, "virtual_stages": 2},
        "micro": 1,  # 2 samples per data-parallel rank: 2 micro-batches for 2 stages
    },
    "tp2 dp4 zero3": {"tp": 2, "pp": 1, "zero": 3},
}


def config(layout: dict):
    cfg = run_config(layout["zero"], layout["tp"], layout["pp"], pattern=PATTERN)
    for key, value in layout.get("parallel", {}).items():
        setattr(cfg.parallel, key, value)
    cfg.trainer.micro_batch_size = layout.get("micro", MICRO)
    return cfg


def rank_batches(i: int, cfg, grid) -> list:
    """This data-parallel rank's micro-batches of global batch ``i``."""
    share = batches()[i].chunk(grid.dp)[grid.dp_rank]
    return list(share.split(cfg.trainer.micro_batch_size))


def save(module, cfg, root: Path, step: int, layout: dict | None) -> Path:
    """The Trainer's phases, as every rank runs them: begin, each rank's part, shared files,
    complete (no data loader here: the trainer state is the step)."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        begin_checkpoint(root, step)
    if layout is not None:
        dist.barrier()
    write = module.prepare_save(copy=False)
    write(tmp_dir(root, step))
    if layout is not None:
        dist.barrier()
    if main:
        write_shared(
            tmp_dir(root, step), {"step": step}, OmegaConf.to_yaml(OmegaConf.structured(cfg))
        )
        finish_checkpoint(root, step, layout)
    if layout is not None:
        dist.barrier()
    return root / f"step_{step:08d}"


def train(name: str, steps: range, resume: Path | None, save_at: int | None, root: Path):
    """Layout ``name`` from ``resume`` (None: from scratch) over ``steps`` (0-based batch
    indices); checkpoint after ``save_at``; returns the losses and the checkpoint."""
    from megatron.core import parallel_state as ps

    watchdog()
    layout = LAYOUTS[name]
    grid = init_grid(layout["tp"], layout["pp"], 120, layout.get("parallel", {}).get("expert", 1))
    cfg = config(layout)
    checkpoint = None if resume is None else verify_checkpoint(resume)
    module = ParallelTrainModule(cfg, grid, checkpoint)
    losses, saved = [], None
    for i in steps:
        out = module.train_step(rank_batches(i, cfg, grid), LR)
        losses.append(out.loss)
        if i + 1 == save_at:
            saved = save(module, cfg, root / name.replace(" ", "_"), i + 1, grid.layout)
    del module
    ps.destroy_model_parallel()
    return losses, saved


def one_process(resume: Path, root: Path):
    """Rank 0 alone: steps 3-4 from ``resume``, checkpoint at 4."""
    cfg = config({"tp": 1, "pp": 1, "zero": 0})
    module = SingleProcessTrainModule(cfg, Grid.one_process(), verify_checkpoint(resume))
    losses = [module.train_step(micro_batches(batches()[i], 0, 1), LR).loss for i in (2, 3)]
    return losses, save(module, cfg, root / "one_process", 4, None)


def main() -> None:
    out_path, root, layouts = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    equivalence = run_layouts(layouts)
    results = {}
    results["reference"], step2 = train("reference", range(6), None, 2, root)
    results["same layout"], _ = train("reference", range(2, 4), step2, None, root)
    results["tp1 pp2 dp4 ep2 v2"], step4 = train("tp1 pp2 dp4 ep2 v2", range(2, 6), step2, 4, root)
    results["back from tp1 pp2 dp4"], _ = train("reference", range(4, 6), step4, None, root)
    results["tp2 dp4 zero3"], step4 = train("tp2 dp4 zero3", range(2, 4), step2, 4, root)
    results["back from zero3"], _ = train("reference", range(4, 6), step4, None, root)
    shared = [None]
    if dist.get_rank() == 0:
        results["one process"], single4 = one_process(step2, root)
        shared = [str(single4)]
    dist.broadcast_object_list(shared, src=0)
    results["back from one process"], _ = train(
        "reference", range(4, 6), Path(shared[0]), None, root
    )
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"resume": results, "equivalence": equivalence}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
