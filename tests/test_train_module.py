"""The TrainModule contract: a one-process run is the degenerate grid, the factory picks the
module from the grid, and the Trainer checkpoints and restores only through the module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

import trainer.loop
from tests.conftest import tiny_config
from trainer import Trainer
from trainer.checkpoint import verify_checkpoint
from trainer.parallel.grid import Grid
from trainer.train_module import SingleProcessTrainModule
from trainer.train_module_base import TrainModule, build_train_module


def test_the_one_process_grid_needs_no_process_group():
    grid = Grid.one_process()
    assert (grid.world, grid.rank, grid.tp, grid.pp, grid.dp) == (1, 0, 1, 1, 1)
    assert grid.is_main and grid.is_first_stage and grid.is_last_stage
    assert grid.layout == {"tp": 1, "pp": 1, "dp": 1}
    assert grid.data_partition is None  # the stream as streaming partitions one process
    # Its collectives are identities: nothing to join, so none is started.
    grid.barrier()
    assert grid.any_rank(True, False) == (True, False)
    assert grid.gather({"error": "x"}, "share") == [{"error": "x"}]
    assert not dist.is_initialized()


def test_the_factory_gives_one_process_the_single_process_module(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data)
    module = build_train_module(cfg, Grid.one_process())
    assert type(module) is SingleProcessTrainModule and isinstance(module, TrainModule)
    assert module.is_main and module.layout == "" and module.checkpoint_layout is None
    assert module.num_params > 0 and module.train_flops_per_token > 0
    module.save_state(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {".metadata", "__0_0.distcp"}
    assert module.state_bytes() >= sum(p.numel() * 4 for p in module.model.parameters())


def test_a_module_that_leaves_out_part_of_the_contract_cannot_be_built(tmp_path, tiny_data):
    class NoSave(SingleProcessTrainModule):
        prepare_save = TrainModule.prepare_save  # the abstract one

    with pytest.raises(TypeError, match="prepare_save"):
        NoSave(tiny_config(tmp_path, tiny_data), Grid.one_process())


def test_the_trainer_checkpoints_and_resumes_only_through_the_module(
    tmp_path, tiny_data, monkeypatch
):
    """Every checkpoint file the module owns comes from its save_state; a resume hands the
    checkpoint to the module's constructor, and the module says which RNG to restore."""
    calls: list[tuple[str, object]] = []

    class Spy(SingleProcessTrainModule):
        def __init__(self, cfg, grid, checkpoint=None):
            calls.append(("init", None if checkpoint is None else checkpoint.step))
            super().__init__(cfg, grid, checkpoint)

        def save_state(self, directory: Path) -> None:
            calls.append(("save", directory.name))
            super().save_state(directory)

        def saved_rng(self, checkpoint, trainer_state):
            calls.append(("rng", checkpoint.step))
            return super().saved_rng(checkpoint, trainer_state)

    monkeypatch.setattr(trainer.loop, "build_train_module", Spy)
    run = tmp_path / "run"
    Trainer(tiny_config(run, tiny_data, max_steps=4, checkpoint_every=2)).fit()
    assert calls == [("init", None), ("save", "step_00000002.tmp"), ("save", "step_00000004.tmp")]
    saved = verify_checkpoint(run / "checkpoints" / "step_00000004")
    assert saved.layout is None  # the one-process format
    calls.clear()
    result = Trainer(tiny_config(run, tiny_data, max_steps=6, checkpoint_every=2)).fit()
    assert calls == [("init", 4), ("rng", 4), ("save", "step_00000006.tmp")]
    assert result.step == 6 and result.resumed_from == saved.path
