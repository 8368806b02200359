"""Learning-rate schedules: cosine, warm-up/stable/decay and constant, looked up by name."""

from __future__ import annotations

import math
import uuid

import pytest

from arch.registry import RegistryError
from trainer import SCHEDULERS, OptimConfig, schedules
from trainer.config import effective_warmup
from trainer.schedules import lr_at

LR = 2e-3
MAX_STEPS = 100
WARMUP = 10


def optim(scheduler: str, **kw) -> OptimConfig:
    opts = {"lr": LR, "warmup_steps": WARMUP, "min_lr_ratio": 0.1, "decay_fraction": 0.2}
    opts.update(kw)
    return OptimConfig(scheduler=scheduler, **opts)


def lrs(cfg: OptimConfig, max_steps: int = MAX_STEPS) -> list[float]:
    return [lr_at(step, max_steps, cfg) for step in range(max_steps + 1)]


@pytest.mark.parametrize("scheduler", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(scheduler):
    values = lrs(optim(scheduler))
    assert values[0] == pytest.approx(LR / WARMUP)
    for step in range(WARMUP):
        assert values[step] == pytest.approx(LR * (step + 1) / WARMUP)
    assert values[WARMUP - 1] == pytest.approx(LR)
    # Constant increments over the warm-up, never above the peak anywhere.
    increments = [b - a for a, b in zip(values[:WARMUP], values[1:WARMUP], strict=False)]
    assert all(d == pytest.approx(LR / WARMUP) for d in increments)
    assert max(values) == pytest.approx(LR)


@pytest.mark.parametrize("scheduler", ["cosine", "wsd", "constant"])
def test_no_warmup_starts_at_peak(scheduler):
    assert lr_at(0, MAX_STEPS, optim(scheduler, warmup_steps=0)) == pytest.approx(LR)


def test_cosine_decays_monotonically_to_the_floor():
    cfg = optim("cosine")
    values = lrs(cfg)
    assert values[WARMUP] == pytest.approx(LR)  # decay starts at the peak
    after = values[WARMUP:]
    assert all(b < a for a, b in zip(after, after[1:], strict=False)), "not strictly decreasing"
    assert values[MAX_STEPS] == pytest.approx(0.1 * LR)
    # Half-way through the decay: the mean of the peak and the floor.
    mid = WARMUP + (MAX_STEPS - WARMUP) // 2
    assert values[mid] == pytest.approx(0.1 * LR + 0.9 * LR * 0.5)
    # The exact cosine shape, not just any decreasing curve.
    step = WARMUP + 30
    progress = 30 / (MAX_STEPS - WARMUP)
    expected = LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert values[step] == pytest.approx(expected)
    # Past max_steps (e.g. a continued run) it stays at the floor.
    assert lr_at(MAX_STEPS + 50, MAX_STEPS, cfg) == pytest.approx(0.1 * LR)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_cosine_floor_follows_min_lr_ratio(ratio):
    cfg = optim("cosine", min_lr_ratio=ratio)
    assert lr_at(MAX_STEPS, MAX_STEPS, cfg) == pytest.approx(ratio * LR)
    assert min(lrs(cfg)[WARMUP:]) == pytest.approx(ratio * LR)


def test_wsd_plateau_then_linear_decay_over_the_last_fraction():
    cfg = optim("wsd", decay_fraction=0.2)
    values = lrs(cfg)
    decay_start = MAX_STEPS - 20
    # Plateau at the peak from the end of warm-up to the start of the decay.
    assert all(v == pytest.approx(LR) for v in values[WARMUP : decay_start + 1])
    assert values[decay_start + 1] < LR
    # Linear decay: equal steps down, reaching the floor exactly at max_steps.
    decay = values[decay_start:]
    drops = [a - b for a, b in zip(decay, decay[1:], strict=False)]
    assert all(d == pytest.approx(0.9 * LR / 20) for d in drops)
    assert values[MAX_STEPS] == pytest.approx(0.1 * LR)
    assert values[decay_start + 10] == pytest.approx(LR * (1 - 0.9 * 0.5))
    assert lr_at(MAX_STEPS + 10, MAX_STEPS, cfg) == pytest.approx(0.1 * LR)


def test_wsd_decay_fraction_moves_the_decay_start():
    short = lrs(optim("wsd", decay_fraction=0.1))
    long = lrs(optim("wsd", decay_fraction=0.5))
    assert short[85] == pytest.approx(LR) and long[85] < LR
    assert long[50] == pytest.approx(LR) and long[51] < LR
    assert short[MAX_STEPS] == pytest.approx(long[MAX_STEPS]) == pytest.approx(0.1 * LR)


def test_constant_stays_at_lr_after_warmup():
    values = lrs(optim("constant"))
    assert all(v == pytest.approx(LR) for v in values[WARMUP:])
    assert lr_at(10 * MAX_STEPS, MAX_STEPS, optim("constant")) == pytest.approx(LR)


def test_schedules_differ_from_each_other():
    step = MAX_STEPS - 5
    got = {name: lr_at(step, MAX_STEPS, optim(name)) for name in ("cosine", "wsd", "constant")}
    assert len({round(v, 12) for v in got.values()}) == 3, got


def test_registry_maps_names_to_the_schedule_functions():
    assert SCHEDULERS.get("cosine") is schedules.cosine
    assert SCHEDULERS.get("wsd") is schedules.warmup_stable_decay
    assert SCHEDULERS.get("constant") is schedules.constant
    assert {"constant", "cosine", "wsd"} <= set(SCHEDULERS.names())


def test_lr_at_uses_the_scheduler_named_in_the_config():
    name = f"test_half_{uuid.uuid4().hex[:8]}"

    def half(step: int, max_steps: int, cfg: OptimConfig) -> float:
        """Half the lr, always (test plugin)."""
        return 0.5

    SCHEDULERS.add(name, half)
    try:
        cfg = optim(name)
        assert lr_at(0, MAX_STEPS, cfg) == pytest.approx(0.5 * LR)
        assert lr_at(77, MAX_STEPS, cfg) == pytest.approx(0.5 * LR)
    finally:
        SCHEDULERS._items.pop(name, None)  # registries are process-global: leave none behind


def test_lr_at_with_unknown_scheduler_names_the_choices():
    with pytest.raises(RegistryError) as err:
        lr_at(0, MAX_STEPS, optim("no_such_schedule"))
    message = str(err.value)
    assert "no_such_schedule" in message
    assert all(name in message for name in ("constant", "cosine", "wsd"))


# ---- a warm-up that is not shorter than the run (a smoke test with the default warm-up) ----------


def test_effective_warmup_leaves_the_run_at_least_one_step_after_it():
    assert effective_warmup(20, 5) == 4
    assert effective_warmup(5, 5) == 4
    assert effective_warmup(4, 5) == 4  # already shorter: unchanged
    assert effective_warmup(3, 5) == 3
    assert effective_warmup(20, 1) == 0  # one step: it runs at the peak
    assert effective_warmup(0, 5) == 0


@pytest.mark.parametrize("scheduler", ["cosine", "wsd", "constant"])
@pytest.mark.parametrize("max_steps", [1, 2, 5, 9])
def test_a_warmup_longer_than_the_run_is_shortened_to_max_steps_minus_one(scheduler, max_steps):
    asked = [lr_at(s, max_steps, optim(scheduler, warmup_steps=20)) for s in range(max_steps)]
    clamped = optim(scheduler, warmup_steps=max_steps - 1)
    assert asked == [lr_at(s, max_steps, clamped) for s in range(max_steps)]
    # Well defined: finite, never above the peak, and the peak is reached (at the last
    # warm-up step, or at step 0 for a one-step run).
    assert all(math.isfinite(v) and 0 < v <= LR * (1 + 1e-12) for v in asked)
    assert asked[max(0, max_steps - 2)] == pytest.approx(LR)
    if max_steps > 2:  # the warm-up is linear up to there
        assert asked[0] == pytest.approx(LR / (max_steps - 1))


def test_a_pinned_warmup_keeps_a_continued_run_out_of_warm_up():
    # A 5-step run warmed up over 4 steps (clamped); continuing to 10 steps with the warm-up
    # pinned at 4 (what the CLI's "continue longer" line passes) never warms up again.
    cfg = optim("cosine", warmup_steps=4)
    first = [lr_at(s, 5, cfg) for s in range(5)]
    longer = [lr_at(s, 10, cfg) for s in range(10)]
    assert first[:4] == longer[:4]
    assert longer[4:] == sorted(longer[4:], reverse=True) and longer[4] == pytest.approx(LR)
