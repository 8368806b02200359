"""`hybridtron plan`: the mission's job (Jamba-52B on 64 H100s) simulated on one CPU, and the
planner's parts checked against the code they stand for.

- `pipeline_census` (one meta build per tensor x expert size, summed per stage) against
  `rank_census` (every rank role built under the fake process group);
- the recommended 52B layout: its 64 simulated ranks hold the model exactly once, and its
  predicted peak is under 80 GB;
- the CLI: the ranked table, --explain, --json, and the one-line answer when nothing fits.
"""

from __future__ import annotations

import json
import warnings

import pytest

from launch.cli import main
from launch.config import load_config
from trainer.parallel.census import Layout, pipeline_census, rank_census
from trainer.parallel.hardware import hardware
from trainer.parallel.planner import Candidate, candidates, configured, plan

JAMBA_52B = 51_570_323_328  # tests/test_census.py


@pytest.fixture(scope="module")
def plan_52b():
    cfg = load_config("configs/jamba_52b.yaml", [], note=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cfg, plan(cfg, hardware("h100", 64))


@pytest.mark.parametrize(
    "layout",
    [
        Layout(tp=2, pp=2, dp=2, ep=2),
        Layout(tp=1, pp=2, dp=2, virtual=2),
        Layout(tp=2, pp=3, dp=1),
    ],
    ids=str,
)
def test_pipeline_census_counts_what_every_rank_role_holds(layout):
    cfg = load_config("configs/jamba_tiny.yaml", [], note=None).model
    fast = pipeline_census(cfg, layout)
    roles = rank_census(cfg, layout)
    assert [s.pp_rank for s in fast] == list(range(layout.pp))
    for shard in fast:
        same_stage = [r for r in roles if r.pp_rank == shard.pp_rank]
        assert {(r.params, r.experts) for r in same_stage} == {(shard.params, shard.experts)}


def test_the_recommended_52b_layout_fits_64_h100s_and_holds_the_model_once(plan_52b):
    cfg, preds = plan_52b
    best = preds[0]
    assert best.fits
    lay = best.candidate.layout
    assert lay.world == 64
    # Predicted peak of the largest rank role (all memory parts) under 80 GB.
    assert best.largest.total < 80e9
    assert all(p.fits for p in preds[: sum(p.fits for p in preds)])  # fitting ones come first
    assert [p.time.total for p in preds[:20]] == sorted(p.time.total for p in preds[:20])
    # The 64 simulated ranks of that layout, every role built for real on the meta device:
    # counted once model-wide they are the model, and the planner's counts are theirs.
    roles = rank_census(configured(cfg, best.candidate).model, lay)
    assert len(roles) == lay.pp * lay.tp * lay.ep
    assert sum(r.owned for r in roles) == JAMBA_52B
    for r in roles:
        assert r.params == best.ranks[r.pp_rank].params


def test_every_candidate_passes_the_launch_validation_and_prices_sensibly(plan_52b):
    cfg, preds = plan_52b
    labels = {p.candidate.label() for p in preds}
    assert len(labels) == len(preds)  # no layout priced twice
    fitting = [p for p in preds if p.fits]
    assert 0 < len(fitting) < len(preds)  # the 52B model does not fit every split
    for p in preds[:50]:
        r = p.largest
        assert r.weights > 0 and r.activations > 0 and p.time.total > 0
        assert 0 < p.mfu < 1
    # More recomputation never predicts more activation memory for the same layout.
    by_label = {p.candidate.label(): p for p in preds}
    for p in preds[:50]:
        c = p.candidate
        if c.recompute == "none":
            full = Candidate(c.layout, c.micro_batch, "full", c.sequence_parallel).label()
            if full in by_label:
                assert by_label[full].largest.activations <= p.largest.activations


def test_candidates_keep_tensor_parallelism_inside_a_node():
    cfg = load_config("configs/jamba_1b.yaml", [], note=None)
    found = list(candidates(cfg, hardware("h100", 16, gpus_per_node=4)))
    assert found and max(c.layout.tp for c in found) == 4


def test_plan_cli_table_explain_and_json(capsys):
    assert main(["plan", "jamba_1b", "--gpus", "8", "--top", "3", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "valid layouts fit 8 x H100" in out
    assert "memory per rank role" in out and "time per step" in out
    assert "efficiency (share of peak)" in out  # every constant is printed
    assert main(["plan", "jamba_1b", "--gpus", "8", "--json", "--top", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["layouts"]) == 2 and data["constants"]["hardware"]["gpus"] == 8
    best = data["layouts"][0]
    assert best["fits"] and best["peak_gib"] < 80
    assert any(item.startswith("parallel.tensor=") for item in best["overrides"])


def test_plan_says_how_many_gpus_would_fit(capsys):
    """1.1B parameters with fp32 AdamW state (18 GB) and activations need more than one 16 GiB
    device; two fit."""
    assert main(["plan", "jamba_1b", "--gpus", "1", "--gpu-memory-gib", "16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "no layout fits 1 x 16 GiB" in err[0] and "2 GPUs would fit" in err[0]


def test_plan_rejects_an_unknown_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "jamba_1b", "--gpus", "8", "--gpu", "tpu"])
    assert exc.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
