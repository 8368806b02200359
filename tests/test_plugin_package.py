"""An out-of-tree plugin package (tests/example_plugin) installed for real and used at scale.

The package registers a mixer (`gated_retention`, with its tensor-parallel plan) through the
entry-point group ``hybridtron.mixer``; it is pip-installed into a temporary directory that
subprocesses get on PYTHONPATH (this process's registries never see it). Checked: the registry
lists it; tp 2, pp 2 and tp 2 x pp 2 train like one process; a tp 2 checkpoint resumes in one
process (resharded), one process evaluates its merged weights, and `hybridtron export` writes
its one-process checkpoint (same tensors, resumes like the shards); a mixer without a plan is
refused at tp 2 with one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, logged_losses, message_lines, run_cli, tiny_run_args
from tests.test_parallel_equivalence import assert_matches_reference, run_layouts
from trainer.checkpoint.dcp_io import read_metadata

SYMBOLS = {"R": "gated_retention"}
# Retention on both pipeline stages, beside attention and an MLP (tp 2 splits both mixers' heads).
LAYOUT_MODEL = {"pattern": "R*R-", "symbols": SYMBOLS}
CLI_MODEL = [
    "model.pattern=R-*-",
    "model.symbols={R: gated_retention}",
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
]
# A resumed run under another layout reorders reductions (see test_distributed_train).
TOLERANCE = 1e-5


# Run with the plugin importable: the merged state of a sharded checkpoint (argv[1]) equals the
# one-process checkpoint's (argv[2]), weights, buffers and optimizer moments, and so do the logits.
COMPARE = """
import sys, torch
from trainer.checkpoint import CheckpointReader, load_pretrained, resolve_checkpoint
want, got = (CheckpointReader(resolve_checkpoint(p)) for p in sys.argv[1:])
assert not got.checkpoint.sharded and want.checkpoint.sharded
a, b = want.model_state(), got.model_state()
assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
assert got.optimizer_step() == want.optimizer_step() > 0
for name in a:
    ma, mb = want.moments(name), got.moments(name)
    assert set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma), name
ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    assert torch.equal(load_pretrained(sys.argv[1])(ids), load_pretrained(sys.argv[2])(ids))
print("equal")
"""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> str:
    """The example package installed (no build isolation: offline, the venv's setuptools) into a
    directory of its own, from a copy so the source tree stays clean."""
    root = tmp_path_factory.mktemp("plugin")
    shutil.copytree(REPO / "tests" / "example_plugin", root / "src")
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
           "--no-build-isolation", "--no-index", "--target", str(site), str(root / "src")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (site / "hybridtron_example_plugin" / "retention.py").exists()
    return str(site)


def test_the_registry_lists_the_installed_mixer(plugin_site):
    proc = run_cli("registry", "list", "mixer", env={"PYTHONPATH": plugin_site})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert "gated_retention" in lines and "causal linear attention" in lines["gated_retention"]
    assert "[tp: all-reduce of wo's output" in lines["gated_retention"]  # its plan's collectives
    assert "[selective recompute: T x T scores]" in lines["gated_retention"]  # its region
    assert "[tp: no plan" in lines["no_plan_mixer"]
    assert "attention" in lines  # the built-ins are still there
    assert "gated_retention" not in run_cli("registry", "list", "mixer").stdout  # not installed


def test_tp2_pp2_and_tp2_x_pp2_train_like_one_process(plugin_site, tmp_path):
    layouts = [
        {"tp": 2, "pp": 1, "zero": 1, **LAYOUT_MODEL},  # dp 2
        {"tp": 1, "pp": 2, "zero": 1, **LAYOUT_MODEL},  # dp 2
        {"tp": 2, "pp": 2, "zero": 1, **LAYOUT_MODEL},
        # Sequence parallel in the generic form (the plugin names no boundary projections).
        {"tp": 2, "pp": 2, "zero": 1, "parallel": {"sequence_parallel": True}, **LAYOUT_MODEL},
    ]
    assert_matches_reference(run_layouts(tmp_path, 4, layouts, pythonpath=(plugin_site,)))


def train(plugin_site: str, data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["train", *tiny_run_args(data, run, *CLI_MODEL, *extra)]
    env = {"PYTHONPATH": plugin_site, "OMP_NUM_THREADS": "1"}
    proc = run_cli(*args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_a_tp2_checkpoint_resumes_resharded_and_exports(plugin_site, tiny_data, tmp_path):
    run = tmp_path / "tp2"
    proc = train(plugin_site, tiny_data, run, "parallel.tensor=2", "--nproc-per-node", "2")
    assert "tp 2" in proc.stdout + proc.stderr
    step2 = run / "checkpoints" / "step_00000002"
    saved = read_metadata(step2).state_dict_metadata  # each rank's boxes of the dense tensors

    def boxes(name: str) -> set:
        return {(tuple(c.offsets), tuple(c.sizes)) for c in saved[f"model.{name}"].chunks}

    # The plugin's plan: 2 of 4 heads per tensor rank, its projection row-parallel, decay split.
    assert boxes("layers.0.inner.wq.weight") == {((0, 0), (16, 32)), ((16, 0), (16, 32))}
    assert boxes("layers.0.inner.wo.weight") == {((0, 0), (32, 16)), ((0, 16), (32, 16))}
    assert boxes("layers.0.inner.decay") == {((0,), (2,)), ((2,), (2,))}

    resumed = tmp_path / "one_process"
    proc = train(plugin_site, tiny_data, resumed, f"trainer.resume_from={step2}")
    assert "[resume]" in proc.stdout + proc.stderr
    want, got = logged_losses(run), logged_losses(resumed)
    assert set(got) == {3, 4}
    for step in (3, 4):
        assert abs(got[step] - want[step]) / want[step] <= TOLERANCE, (step, got, want)

    # Export: one process evaluates the tp 2 checkpoint's merged weights; Hugging Face has no
    # family for this mixer, which export-hf says in one line.
    step4 = str(run / "checkpoints" / "step_00000004")
    env = {"PYTHONPATH": plugin_site}
    proc = run_cli("eval", step4, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out loss" in proc.stdout
    proc = run_cli("export-hf", step4, str(tmp_path / "hf"), env=env)
    lines = message_lines(proc.stderr)
    assert proc.returncode != 0 and len(lines) == 1 and "'gated_retention'" in lines[0], lines

    # `hybridtron export` consolidates the tp 2 checkpoint into one process for this mixer too:
    # the same tensors and logits (compared where the plugin is importable: not this process),
    # and training resumed from the export continues the run like the sharded checkpoint does.
    exported = tmp_path / "exported"
    export = run_cli("export", str(step2), str(exported), env=env)
    assert export.returncode == 0, export.stderr[-2000:]
    assert len(export.stdout.strip().splitlines()) == 1 and "exported" in export.stdout
    compare = [sys.executable, "-c", COMPARE, str(step2), str(exported)]
    proc = subprocess.run(compare, cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "equal" in proc.stdout, proc.stderr[-3000:]
    proc = run_cli("eval", str(exported), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out loss" in proc.stdout
    from_export = tmp_path / "from_export"
    resume_from = exported / "checkpoints" / "step_00000002"  # what export printed
    assert str(resume_from) in export.stdout
    train(plugin_site, tiny_data, from_export, f"trainer.resume_from={resume_from}")
    assert logged_losses(from_export) == got  # the same state as resuming the shards


def test_a_mixer_without_a_plan_is_refused_at_tp2_in_one_line(plugin_site, tiny_data, tmp_path):
    no_plan = ["model.symbols={N: no_plan_mixer}", "model.pattern=N-"]
    args = tiny_run_args(tiny_data, tmp_path / "run", *no_plan, "parallel.tensor=2")
    env = {"PYTHONPATH": plugin_site}
    proc = run_cli("train", *args, "--nproc-per-node", "2", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = message_lines(proc.stderr)
    assert len(lines) == 1, lines
    assert "'no_plan_mixer'" in lines[0] and "tensor_parallel_plan" in lines[0]
    # The same mixer trains in one process.
    args = tiny_run_args(tiny_data, tmp_path / "one", *no_plan, "trainer.max_steps=1")
    proc = run_cli("train", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
