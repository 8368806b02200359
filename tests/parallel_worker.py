"""One rank of the layout-equivalence test (tests/test_parallel_equivalence.py).

Runs several dp x pp x tp layouts one after another inside one process group (start-up dominates
on 2 cores), each for a few optimizer steps on the same global batches, and writes the losses and
gradient norms. Rank 0 also trains the same model in one process (the reference).

    torchrun --nproc-per-node W tests/parallel_worker.py OUT.json '[{"tp": 2, "pp": 1, "zero": 1}]'
"""

from __future__ import annotations

import faulthandler
import json
import sys
import warnings

import torch
import torch.distributed as dist

warnings.simplefilter("ignore")

from arch.config import ModelConfig  # noqa: E402
from arch.model import SubLayer  # noqa: E402
from trainer.config import RunConfig  # noqa: E402
from trainer.parallel.data_parallel import DataParallelEngine  # noqa: E402
from trainer.parallel.grid import Grid, init_grid  # noqa: E402
from trainer.parallel.train_module import ParallelTrainModule  # noqa: E402
from trainer.train_module import SingleProcessTrainModule  # noqa: E402

STEPS = 4
MICRO, GLOBAL, SEQ, VOCAB = 2, 8, 16, 61


# What a layout may set besides tp/pp/zero: the model (the reference is trained once per model).
MODEL_KEYS = ("residual", "pattern", "top_k", "symbols", "capacity")


def model_key(layout: dict) -> str:
    return json.dumps({k: layout[k] for k in MODEL_KEYS if k in layout}, sort_keys=True)


def run_config(
    zero: int,
    tp: int,
    pp: int,
    residual: str = "heavy_ball",
    pattern: str = "*M-E*-",
    top_k: int = 1,
    symbols: dict[str, str] | None = None,
    capacity: float | None = None,
) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(
        pattern=pattern,  # default: attention, Mamba, MLP, MoE
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=VOCAB,
        ffn_hidden=64,
        symbols=symbols or {},  # out-of-tree plugins (tests/test_plugin_package.py)
    )
    cfg.model.residual.name = residual
    # More experts than a micro-batch's 32 tokens fill: some get no token on some rank, and every
    # rank must still reduce the same gradients (ZeRO's buckets would mismatch otherwise).
    cfg.model.moe.num_experts = 16
    cfg.model.moe.top_k = top_k
    cfg.model.moe.capacity_factor = capacity  # None: dropless
    cfg.trainer.seed = 7
    cfg.trainer.micro_batch_size = MICRO
    cfg.trainer.global_batch_size = GLOBAL
    cfg.trainer.seq_len = SEQ
    cfg.optim.lr = 3e-3
    cfg.optim.grad_clip = 0.5  # small, so clipping is active and the norm must be exact
    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage = tp, pp, zero
    return cfg


def held_out() -> torch.Tensor:
    """5 evaluation samples: micro-batches of 2, 2 and 1 (a last one of another shape, and a
    count that is no multiple of the pipeline stages)."""
    g = torch.Generator().manual_seed(13)
    return torch.randint(0, VOCAB, (5, SEQ + 1), generator=g)


def global_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g) for _ in range(STEPS)]


def micro_batches(batch: torch.Tensor, dp_rank: int, dp: int) -> list[torch.Tensor]:
    """This data-parallel rank's micro-batches of a global batch (a contiguous share)."""
    share = batch.chunk(dp)[dp_rank]
    return list(share.split(MICRO))


def model_options(layout: dict) -> dict:
    return {k: layout[k] for k in MODEL_KEYS if k in layout}


def summary(out: list) -> dict:
    """Losses, gradient norms and the MoE metrics (balance, aux/z losses, loads) per step; the
    pipeline metrics (bubble fractions) of the last step."""
    moe = [{k: v for k, v in o.metrics.items() if k.startswith("moe/")} for o in out]
    pipeline = {k: v for k, v in out[-1].metrics.items() if k.startswith("pipeline/")}
    return {
        "loss": [o.loss for o in out],
        "grad_norm": [o.grad_norm for o in out],
        "moe": moe,
        "pipeline": pipeline,
    }


def reference(layout: dict) -> dict:
    cfg = run_config(0, 1, 1, **model_options(layout))
    module = SingleProcessTrainModule(cfg, Grid.one_process())
    out = [module.train_step(micro_batches(b, 0, 1), 3e-3) for b in global_batches()]
    return {**summary(out), "eval": module.eval_loss(held_out(), MICRO)}


def check_engine(module: ParallelTrainModule, zero: int, zero_group: int) -> None:
    """DeepSpeed's ZeRO only where it partitions something (a ZeRO group of several ranks);
    else the plain engine, whose optimizer steps the model's own tensors (no copies)."""
    plain = isinstance(module.engine, DataParallelEngine)
    assert plain == (zero == 0 or zero_group == 1), (type(module.engine), zero, zero_group)
    if plain:
        stepped = {id(p) for g in module.engine.optimizer.param_groups for p in g["params"]}
        assert all(id(p) in stepped for p in module.stage.model.parameters())


def run_layout(layout: dict) -> dict:
    from megatron.core import parallel_state as ps

    world = dist.get_world_size() if dist.is_initialized() else None
    tp, pp = layout["tp"], layout["pp"]
    grid = init_grid(tp, pp, timeout_s=120, expert=layout.get("parallel", {}).get("expert", 1))
    cfg = run_config(layout["zero"], tp, pp, **model_options(layout))
    for key, value in layout.get("parallel", {}).items():  # e.g. {"recompute": "full"}
        setattr(cfg.parallel, key, value)
    module = ParallelTrainModule(cfg, grid)  # GLOBAL // (MICRO * dp) micro-batches a step
    modes = {m.recompute for m in module.stage.modules() if isinstance(m, SubLayer)}
    assert modes == {cfg.parallel.recompute}, modes  # the option reached every sub-layer
    check_engine(module, layout["zero"], grid.dp // grid.ep)
    # What each rank holds, for `trainer.parallel.census` to be checked against (the test).
    # (ZeRO-3 partitions the tensors themselves: ds_numel is the shard's full size.)
    held = sum(getattr(p, "ds_numel", p.numel()) for p in module.stage.model.parameters())
    rank_params = [None] * dist.get_world_size()
    dist.all_gather_object(rank_params, [grid.pp_rank, grid.tp_rank, grid.ep_rank, held])
    out = [
        module.train_step(micro_batches(b, grid.dp_rank, grid.dp), 3e-3) for b in global_batches()
    ]
    evaluated = module.eval_loss(held_out(), MICRO)
    del module
    ps.destroy_model_parallel()
    assert world is None or dist.get_world_size() == world
    return {
        **summary(out),
        "eval": evaluated,
        "micro_batches": GLOBAL // (MICRO * grid.dp),
        "rank_params": rank_params,
    }


def watchdog(pieces: int = 1) -> None:
    """A mismatched collective hangs on gloo: end this rank with its stack if the next
    ``pieces`` pieces of work (layouts, references) take over 4 minutes each (re-armed as the
    work goes, so the number of layouts in one launch does not matter)."""
    faulthandler.dump_traceback_later(240 * pieces, exit=True)


def run_layouts(layouts: list[dict]) -> dict | None:
    """Train ``layouts`` one after another, then (rank 0) each model's one-process reference;
    rank 0 returns what the test compares, the others None (all: None for no layouts)."""
    if not layouts:
        return None
    results = []
    for layout in layouts:
        watchdog()
        results.append(run_layout(layout))
    models = {model_key(layout): layout for layout in layouts}
    watchdog(len(models))  # rank 0 trains every reference while the others wait
    payload = None
    if dist.get_rank() == 0:
        references = {key: reference(layout) for key, layout in models.items()}
        keys = [model_key(layout) for layout in layouts]  # each layout's reference
        payload = {"references": references, "layouts": layouts, "results": results, "keys": keys}
    dist.barrier()
    return payload


def main() -> None:
    out_path, layouts = sys.argv[1], json.loads(sys.argv[2])
    payload = run_layouts(layouts)
    if payload is not None:
        with open(out_path, "w") as f:
            json.dump(payload, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
