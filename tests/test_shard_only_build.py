"""Shard-only construction and loading (issue 14): a rank builds and reads only its share.

In process, with a tensor-parallel context that builds a rank's local shapes without process
groups (`LocalShapes`): the seeded unit-by-unit build gives each rank exactly its cut of the
one-process model, a pipeline stage's build never holds more than one dense unit, seed scopes
make a unit's (and an expert's) values independent of the rest of the model, and the checkpoint
reader returns any rank's slice from shards saved under another layout. The multi-process
equivalence and resume tests (test_parallel_equivalence.py, test_distributed_train.py) run the
same code over real process groups.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch
from omegaconf import OmegaConf
from torch import nn

from arch import ModelConfig
from arch.config import MoEConfig, PreconditionerConfig
from arch.model import HybridLM, build_model, materialize, unit_names
from arch.model_plan import split_of
from arch.tensor_parallel_plan import Split, TensorParallel, split_tensor
from tests.test_tensor_parallel import hybrid as tensor_parallel_hybrid
from trainer.checkpoint import CheckpointReader, piece_chunks, save_chunks, verify_checkpoint
from trainer.checkpoint.dcp_io import STEP_KEY, model_key, moment_key
from trainer.checkpoint.writer import begin_checkpoint, finish_checkpoint, write_shared
from trainer.config import RunConfig
from trainer.parallel.stages import PipelineStage, stage_layer_ranges

PC = PreconditionerConfig(name="pc", options={"targets": ["w1", "w2", "wo", "in_proj", "x_proj"]})


def hybrid(**kw) -> ModelConfig:
    """Attention, MLP, Mamba, Mamba-2 and MoE sub-layers, PC-wrapped projections, untied head,
    two pipeline stages."""
    options = {"pattern": "*-M-|S-*E", "tie_embeddings": False, "preconditioner": PC}
    return tensor_parallel_hybrid(**{**options, **kw})


class LocalShapes(TensorParallel):
    """Rank ``rank`` of ``size``'s local form with plain modules and no collectives: enough to
    build and initialise a rank's shard in one process (its forward would not be the model's)."""

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank
        self.marked: dict[int, Split] = {}

    def local_linear(self, in_features: int, out_features: int, split: Split) -> nn.Module:
        if split.column_parallel:
            return nn.Linear(in_features, out_features // self.size, bias=False)
        return nn.Linear(in_features // self.size, out_features, bias=False)

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab // self.size, dim)

    def mark_split(self, param: nn.Parameter, split: Split) -> None:
        self.marked[id(param)] = split


def assert_is_the_cut(model: nn.Module, dense: dict, cfg: ModelConfig, rank: int, size: int):
    state = model.state_dict()
    assert state.keys() <= dense.keys() and state
    for name, tensor in state.items():
        split = split_of(name, cfg)
        want = dense[name] if split is None else split_tensor(dense[name], split, rank, size)
        assert torch.equal(tensor, want), name


def test_a_tensor_parallel_rank_builds_exactly_its_cut_of_the_one_process_model():
    cfg = hybrid()
    dense = build_model(cfg, seed=3).state_dict()
    for size, rank in ((2, 0), (2, 1), (4, 3)):
        tp = LocalShapes(size, rank)
        model = build_model(cfg, seed=3, tp=tp)
        assert model.state_dict().keys() == dense.keys()
        assert_is_the_cut(model, dense, cfg, rank, size)
        for name, p in model.named_parameters():  # split ones marked, plugins' marks kept
            assert (id(p) in tp.marked) == (split_of(name, cfg) is not None), name
        assert model.layers[2].inner.A_log._no_weight_decay


class LiveDenseBytes:
    """Bytes of real (not meta) parameters registered while active and still alive, and their
    peak: what a build holds beyond the rank's own allocation (which `to_empty` makes without
    registering)."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self.embeddings = 0

    def __enter__(self) -> LiveDenseBytes:
        self.handle = nn.modules.module.register_module_parameter_registration_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def hook(self, module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is None or param.device.type == "meta":
            return
        nbytes = param.numel() * param.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.embeddings += isinstance(module, nn.Embedding)
        weakref.finalize(param, self.freed, nbytes)

    def freed(self, nbytes: int) -> None:
        self.live -= nbytes


def unit_bytes(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        whole = HybridLM(cfg, init=False)
    return {
        name: sum(p.numel() * 4 for p in whole.get_submodule(name).parameters())
        for name in unit_names(cfg)
    }


def test_a_pipeline_stage_builds_its_units_one_at_a_time_never_the_dense_model():
    cfg = hybrid()
    sizes = unit_bytes(cfg)
    with LiveDenseBytes() as one_process:
        dense = build_model(cfg, seed=5).state_dict()
    assert one_process.peak >= sum(sizes.values())  # the measure sees a dense build
    (start, end), last = stage_layer_ranges(cfg, 2)[1], True
    for rank in (0, 1):
        with torch.device("meta"):
            model = HybridLM(cfg, tp=LocalShapes(2, rank), init=False)
        stage = PipelineStage(model, [(start, end)], first=False, last=last)
        with LiveDenseBytes() as built:
            materialize(stage.model, seed=5)
        held = [f"layers.{i}" for i in range(start, end)] + ["norm", "head"]
        assert 0 < built.peak <= max(sizes[name] for name in held) < sum(sizes.values()) / 3
        assert built.embeddings == 0  # the first stage's unit is never built here
        assert_is_the_cut(stage.model, dense, cfg, rank, 2)
        assert not any(t.is_meta for t in stage.model.state_dict().values())


def test_a_units_values_depend_on_its_name_and_the_seed_alone():
    """Units (and, inside the MoE, each expert) draw from streams of their own, so changing one
    sub-layer, or the number of experts, leaves the others' values as they were."""
    a = build_model(hybrid(pattern="*-M-E-"), seed=9).state_dict()
    b = build_model(hybrid(pattern="*-S-E-"), seed=9).state_dict()
    others = [n for n in a if not n.startswith("layers.2.")]
    assert all(torch.equal(a[n], b[n]) for n in others)
    assert {n for n in a if n not in others} != {n for n in b if n.startswith("layers.2.")}
    more = hybrid(pattern="*-M-E-", moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=32))
    c = build_model(more, seed=9).state_dict()
    experts = [n for n in a if ".experts." in n]
    assert experts and all(torch.equal(a[n], c[n]) for n in experts)
    w1 = "layers.4.inner.experts.{}.w1.lin.weight"
    assert not torch.equal(c[w1.format(7)], c[w1.format(0)])


def test_the_reader_returns_any_ranks_slice_from_pieces_of_another_layout(tmp_path):
    """What tp 2 x pp 2 x dp 3 ZeRO ranks hold (each tensor shard cut into 3 uneven flat
    ranges, as ZeRO partitions a flat buffer) written as boxes of the dense tensors, then read
    back as any tensor rank's slice of any size: every weight and moment exactly."""
    cfg = hybrid(preconditioner=PreconditionerConfig())
    model = build_model(cfg, seed=1)
    dense = model.state_dict()
    params = dict(model.named_parameters())
    chunks = []
    for name, full in dense.items():
        split = split_of(name, cfg)
        for tp in range(2) if split is not None else range(1):  # a replica is written once
            shard = full if split is None else split_tensor(full, split, tp, 2)
            flat, n = shard.reshape(-1), shard.numel()
            cuts = [0, n // 5, (3 * n) // 4, n]  # ZeRO ranks 0-2: ranges that cut rows
            for lo, hi in zip(cuts, cuts[1:], strict=False):
                args = (tuple(shard.shape), lo, flat[lo:hi], split, tp, 2 if split else 1)
                chunks += piece_chunks(model_key(name), *args)
                if name in params:
                    moment = (flat[lo:hi] * 2, *args[3:])
                    chunks += piece_chunks(moment_key(name, "exp_avg"), *args[:2], *moment)
    tmp = begin_checkpoint(tmp_path, 1)
    save_chunks(tmp, chunks, {STEP_KEY: 7})
    write_shared(tmp, {"step": 1}, OmegaConf.to_yaml(OmegaConf.structured(RunConfig(model=cfg))))
    reader = CheckpointReader(
        verify_checkpoint(finish_checkpoint(tmp_path, 1, {"tp": 2, "pp": 2, "dp": 3}))
    )
    assert reader.optimizer_step() == 7 and set(reader.names()) == set(dense)
    for size in (1, 2, 4):
        for rank in range(size):
            got = reader.tensors(list(dense), rank, size)
            for name, full in dense.items():
                split = split_of(name, cfg)
                want = full if split is None else split_tensor(full, split, rank, size)
                assert torch.equal(got[name], want), (name, rank, size)
                if name in params:
                    moment = reader.moments(name, rank, size)["exp_avg"]
                    assert torch.equal(moment, want * 2), (name, rank, size)


def test_an_unseeded_build_is_random_and_reproducible_under_manual_seed():
    cfg = replace(hybrid(), pattern="*-")
    torch.manual_seed(0)
    a = build_model(cfg).state_dict()
    torch.manual_seed(0)
    b = build_model(cfg).state_dict()
    c = build_model(cfg).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])
