"""Activation recomputation (`parallel.recompute`, `arch.recompute`) changes memory, not results.

For every built-in mixer and FFN, a residual plugin that evaluates its sub-layer twice and the
example out-of-tree plugin: the loss, the auxiliary losses, the MoE metrics and every parameter
gradient under ``selective`` and ``full`` are bit-identical to ``none`` in fp32 (the backward runs
on the same graph, only saved tensors are recomputed by the same ops). The Mamba-1 `cpu` scan
keeps no [L, B, D, N] state for the backward when recomputation is on; a recomputed forward
reports no auxiliary loss twice. Layouts (tp, pp, dp / ZeRO) are in test_parallel_equivalence.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.checkpoint import CheckpointError

from arch import ModelConfig, build_model, lm_loss
from arch.aux_losses import recording
from arch.layers_registry import MIXERS, RESIDUALS
from arch.model import aux_loss_counts
from arch.recompute import MODES, recompute_note, set_recompute
from arch.registry import ConfigError
from arch.residual import ResidualUpdate
from tests.conftest import REPO

B, T, VOCAB = 2, 24, 97


def config(pattern: str, **overrides) -> ModelConfig:
    cfg = ModelConfig(pattern=pattern, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=VOCAB)
    cfg.ffn_hidden = 48
    cfg.moe.num_experts, cfg.moe.top_k = 4, 2
    cfg.moe.z_loss_weight = 1e-3
    cfg.mamba2.head_dim, cfg.mamba2.chunk_size = 16, 8  # T = 24: three chunks
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def ids(seed: int = 0, eos: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    doc_ids = None
    if eos:  # two documents per row: the Mamba resets and the attention block mask
        doc_ids = (torch.arange(T) >= T // 3).long().expand(B, T)
    return tokens, doc_ids


def step(
    cfg: ModelConfig, mode: str, eos: bool = False, bf16: bool = False
) -> dict[str, torch.Tensor]:
    """Loss, auxiliary losses, metrics and every gradient of one forward (``bf16``: under
    autocast, as training does) and backward."""
    model = build_model(cfg, seed=0)
    set_recompute(model, mode)
    tokens, doc_ids = ids(eos=eos)
    counts = aux_loss_counts(cfg)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        recording(counts, counts) as recorder,
    ):
        logits = model(tokens[:, :-1], doc_ids)
    aux = recorder.losses
    loss = lm_loss(logits, tokens[:, 1:]) + sum(aux.values())
    loss.backward()
    out = {"loss": loss.detach(), **{k: v.detach() for k, v in aux.items()}}
    out.update({f"metric {k}": v for k, v in recorder.metrics.items()})
    out.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert sum(k.startswith("grad") for k in out) == sum(1 for _ in model.parameters())
    return out


def assert_identical(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        assert torch.equal(got[key], want[key]), f"{what}: {key} differs"


class _TwiceResidual(ResidualUpdate):
    """Evaluates its sub-layer at two points (a multi-call oracle)."""

    oracle_calls = 2

    def forward(self, state, oracle):
        x = state["x"]
        return {**state, "x": x + 0.5 * (oracle(x) + oracle(0.5 * x))}


@pytest.fixture
def twice_residual():
    RESIDUALS.add("_test_twice", _TwiceResidual)
    yield "_test_twice"
    RESIDUALS._items.pop("_test_twice", None)  # registries are process-global


CASES = {
    "attention": ("**", {}),
    "attention eager": ("**", {"attention": "eager"}),
    "mamba cpu scan": ("MM", {"scan": "cpu"}),
    "mamba chunked scan": ("MM", {"scan": "chunked"}),
    "mamba2": ("SS", {}),
    "mlp": ("--", {}),
    "mlp and attention with the pc layer": ("*-", {"preconditioner": "pc"}),
    "moe": ("EE", {}),
    "moe with capacity": ("EE", {"capacity": 1.0}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_builtin_sub_layer_gives_identical_losses_and_gradients(case):
    pattern, opts = CASES[case]
    cfg = config(pattern)
    cfg.mamba.scan = opts.get("scan", "auto")
    cfg.attention.name = opts.get("attention", "sdpa")
    cfg.moe.capacity_factor = opts.get("capacity")
    cfg.preconditioner.name = opts.get("preconditioner", "none")
    want = step(cfg, "none")
    for mode in ("selective", "full"):
        assert_identical(step(cfg, mode), want, f"{case} {mode}")


def test_packed_documents_and_a_residual_with_two_oracle_calls(twice_residual):
    """Every kind in one model, documents reset inside the recomputed scans, and a residual
    plugin that evaluates each sub-layer twice (its MoE reports twice per sub-layer)."""
    cfg = config("*M-ES")
    cfg.residual.name = twice_residual
    cfg.mamba.scan = "cpu"
    want = step(cfg, "none", eos=True)
    assert "moe/aux_loss" in want and "metric moe/balance" in want
    for mode in ("selective", "full"):
        assert_identical(step(cfg, mode, eos=True), want, mode)


def test_bf16_autocast_is_replayed_in_the_recomputation():
    """The backward (which recomputes) runs outside autocast, as in training."""
    cfg = config("*M-E")
    want = step(cfg, "none", bf16=True)
    assert not torch.equal(want["loss"], step(cfg, "none")["loss"])  # bf16 did change it
    for mode in ("selective", "full"):
        assert_identical(step(cfg, mode, bf16=True), want, f"bf16 {mode}")


def test_the_example_out_of_tree_plugin_under_recomputation():
    path = REPO / "tests/example_plugin/hybridtron_example_plugin/retention.py"
    spec = importlib.util.spec_from_file_location("_example_retention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    MIXERS.add("_test_retention", module.GatedRetention)
    try:
        cfg = config("R-*E")
        cfg.symbols = {"R": "_test_retention"}
        want = step(cfg, "none")
        for mode in ("selective", "full"):
            assert_identical(step(cfg, mode), want, mode)
        # Its selective region (the T x T scores) is not kept; `registry list` names it.
        scores = torch.Size([B, cfg.n_heads, T, T])
        assert scores in saved_shapes(cfg, "none")
        assert scores not in saved_shapes(cfg, "selective")
        assert "T x T" in recompute_note("mixer", module.GatedRetention)
    finally:
        MIXERS._items.pop("_test_retention", None)


def saved_shapes(cfg: ModelConfig, mode: str) -> list[torch.Size]:
    """Shapes of every tensor autograd keeps from the forward for the backward (a checkpointed
    region keeps its inputs instead, outside these hooks)."""
    model = build_model(cfg, seed=0)
    set_recompute(model, mode)
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model(ids()[0][:, :-1]), ids()[0][:, 1:])
    loss.backward()
    return shapes


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_the_mamba_cpu_scan_keeps_no_per_step_states(mode):
    cfg = config("M")
    cfg.mamba.scan = "cpu"
    states = torch.Size([T, B, cfg.mamba.expand * cfg.d_model, cfg.mamba.d_state])
    assert states in saved_shapes(cfg, "none")  # what the scan keeps without recomputation
    assert states not in saved_shapes(cfg, mode)


def test_a_backward_inside_the_recording_block_reports_nothing_twice():
    """The recomputed forward reports to no one: the MoE's losses and metrics (and the
    experts' MLP metrics) are reported once per sub-layer even when the backward (which
    recomputes) runs while the step's recorder is still active."""
    cfg = config("E-E")
    for mode in MODES:
        model = build_model(cfg, seed=0)
        set_recompute(model, mode)
        tokens, _ = ids()
        with recording() as recorder:
            lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward(retain_graph=True)
            sum(recorder.losses.values()).backward()
        assert {k: len(v) for k, v in recorder._losses.items()} == {
            "moe/aux_loss": 2,
            "moe/z_loss": 2,
        }, mode
        assert len(recorder._metrics["moe/balance"]) == 2, mode
        assert len(recorder._metrics["ffn/zero_fraction/L1"]) == 1, mode


def test_a_recomputed_forward_must_replay_the_same_computation():
    """Recomputation relies on the sub-layer being a function of its inputs and parameters;
    torch's checkpoint notices (and stops) when a changed weight gives other saved tensors."""
    model = build_model(config("-"), seed=0)
    set_recompute(model, "full")
    tokens, _ = ids()
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    with torch.no_grad():
        model.layers[0].inner.w1.weight.data = torch.zeros(1, 32)  # another shape
    with pytest.raises(CheckpointError):
        loss.backward()


def test_no_grad_runs_plainly_and_modes_are_checked():
    model = build_model(config("*M"), seed=0)
    set_recompute(model, "full")
    assert {layer.recompute for layer in model.layers} == {"full"}
    tokens, _ = ids()
    with torch.no_grad():  # evaluation and generation: no checkpoint, no warning
        assert not model(tokens[:, :-1]).requires_grad
    with pytest.raises(ConfigError) as err:
        set_recompute(model, "partial")
    assert err.value.key == "parallel.recompute"
    assert "none, selective, full" in str(err.value)
    assert "selective scan" in recompute_note("mixer", MIXERS.get("mamba"))


def test_the_one_process_train_module_trains_identically_under_full_recomputation():
    """`parallel.recompute` reaches the model through SingleProcessTrainModule: two optimizer
    steps (micro-batches, clipping, AdamW) with the same losses, norms, metrics and weights."""
    from trainer.config import RunConfig
    from trainer.parallel.grid import Grid
    from trainer.train_module import SingleProcessTrainModule

    batches = [ids(seed)[0] for seed in range(4)]
    runs = {}
    for mode in ("none", "full"):
        cfg = RunConfig()
        cfg.model = config("M*E")
        cfg.optim.grad_clip = 0.5
        cfg.parallel.recompute = mode
        module = SingleProcessTrainModule(cfg, Grid.one_process())
        assert {layer.recompute for layer in module.model.layers} == {mode}
        steps = [module.train_step(batches[i : i + 2], 1e-3) for i in (0, 2)]
        runs[mode] = (steps, module.model.state_dict())
    (want, want_state), (got, got_state) = runs["none"], runs["full"]
    assert got == want and "moe/balance" in want[0].metrics
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
