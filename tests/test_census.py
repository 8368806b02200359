"""`trainer.parallel.census`: every rank role of a layout built on the meta device under torch's
fake process-group backend, no GPU and no other process. The multi-process equivalence tests
check it against what real ranks hold (`assert_census_matches_ranks`); here, the mission's model
(`configs/jamba_52b.yaml`) on 64 simulated ranks."""

from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist

from launch.config import load_config
from trainer.parallel.census import Layout, RankShard, model_parameters, rank_census, state_bytes

JAMBA_52B = 51_570_323_328  # `hybridtron train configs/jamba_52b.yaml --dry-run`


@pytest.fixture(scope="module")
def jamba_52b():
    return load_config("configs/jamba_52b.yaml", [], note=None).model


def test_the_52b_recipe_is_jamba_v01(jamba_52b):
    assert model_parameters(jamba_52b) == JAMBA_52B
    layers = jamba_52b.pattern
    assert len(layers) == 64 and layers.count("*") == 4 and layers.count("E") == 16


def test_64_simulated_ranks_hold_the_whole_52b_model_once(jamba_52b):
    """tp 2 x pp 4 x dp 8 with the 16 experts over ep 8: 64 distinct rank roles."""
    layout = Layout(tp=2, pp=4, dp=8, ep=8, zero=1)
    census = rank_census(jamba_52b, layout)
    roles = {(r.pp_rank, r.tp_rank, r.ep_rank) for r in census}
    assert roles == set(itertools.product(range(4), range(2), range(8)))
    # Counted once each (splits on every TP rank, replicated tensors on TP rank 0, each expert
    # on its expert rank, dense tensors on expert rank 0), the roles hold the model exactly.
    assert sum(r.owned for r in census) == JAMBA_52B
    # Each stage's experts divide evenly over the expert and tensor ranks.
    for stage in range(4):
        assert len({r.experts for r in census if r.pp_rank == stage}) == 1
    # The largest rank: ~1.58B parameters; ZeRO over an expert-data-parallel group of one rank
    # runs as the plain engine (whole fp32 weights, gradients and AdamW moments: 16 bytes each).
    largest = max(census, key=lambda r: r.params)
    assert 1.4e9 < largest.params < 1.7e9
    assert layout.effective_zero == 0
    assert sum(state_bytes(largest, layout).values()) == 16 * largest.params
    assert not dist.is_initialized()  # the fake group is gone


def test_zero_partitions_the_state_over_its_group():
    shard = RankShard(pp_rank=0, tp_rank=0, ep_rank=0, params=1_000_000, owned=0, experts=0)
    n = shard.params
    one = state_bytes(shard, Layout(tp=2, pp=4, dp=8, ep=2, zero=1))  # over 4 ranks
    assert one == {"weights": 4 * n, "grads": 4 * n + 4 * n / 4, "optimizer": 3 * 4 * n / 4}
    two = state_bytes(shard, Layout(tp=2, pp=4, dp=8, ep=2, zero=2))
    assert two["grads"] == 4 * n / 4
    three = state_bytes(shard, Layout(tp=2, pp=1, dp=8, ep=2, zero=3))
    assert three == {"weights": n, "grads": n, "optimizer": 3 * n}
    # A ZeRO group of one rank (dp = ep) partitions nothing: the plain engine's whole state.
    assert state_bytes(shard, Layout(dp=2, ep=2, zero=2)) == {
        "weights": 4 * n,
        "grads": 4 * n,
        "optimizer": 8 * n,
    }


def test_a_census_inside_a_distributed_job_is_refused(tmp_path):
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        with pytest.raises(RuntimeError, match="outside a distributed job"):
            rank_census(load_config("configs/jamba_tiny.yaml", [], note=None).model, Layout(tp=2))
    finally:
        dist.destroy_process_group()
