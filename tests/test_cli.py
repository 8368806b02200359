"""End to end through the real `hybridtron` CLI, in subprocesses, on the tiny data.

Each subprocess spends ~3 s importing torch, so the runs are batched: every command that does not
depend on another runs two at a time, in module-scoped fixtures, and the tests read the results.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY_SEQ_LEN, run_cli

KINDS = [
    "mixer",
    "ffn",
    "attention",
    "residual",
    "preconditioner",
    "optimizer",
    "scheduler",
    "tokenizer",
    "dataset",
]
SUBCOMMANDS = ["train", "eval", "generate", "prepare-data", "registry"]
PROMPT = "def "
STEPS = 6


def run_parallel(jobs: dict) -> dict:
    """{name: callable} -> {name: result}, two at a time (the machine has 2 cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_data):
    """Phase 1: train + every independent command; phase 2: eval and generate on the run."""
    work = tmp_path_factory.mktemp("cli")
    # A private copy of the data: a streaming dataset still open on tiny_data in this
    # process (other test modules train in-process) would make the child's a reuse of it.
    data = work / "data"
    shutil.copytree(tiny_data, data)
    run_dir = work / "run"
    prepared = work / "prepared"
    train_args = [
        "train",
        "tiny",
        f"trainer.seq_len={TINY_SEQ_LEN}",
        f"data.path={data}",
        f"trainer.run_dir={run_dir}",
        f"trainer.max_steps={STEPS}",
        "trainer.eval_every=3",
        "trainer.checkpoint_every=3",
        "trainer.log_every=1",
        "trainer.progress=false",
        "optim.warmup_steps=2",
    ]
    prepare_args = ["prepare-data", f"data.path={prepared}", "data.max_bytes=50000"]

    def prepare_twice():
        # Same inputs and settings again: a no-op. Other settings over it: refused.
        return (
            run_cli(*prepare_args),
            run_cli(*prepare_args),
            run_cli(*prepare_args[:-1], "data.max_bytes=40000"),
        )

    jobs = {
        "train": lambda: run_cli(*train_args),
        "prepare": prepare_twice,
        "registry": lambda: run_cli("registry", "list"),
        "registry_nope": lambda: run_cli("registry", "list", "nope"),
    }
    for sub in SUBCOMMANDS:
        jobs[f"help_{sub}"] = lambda sub=sub: run_cli(sub, "--help")
    results = run_parallel(jobs)

    ckpt = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    greedy = ["generate", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "20"]
    nucleus = [*greedy, "--top-p", "0.9", "--seed", "1"]
    if results["train"].returncode == 0:
        results.update(
            run_parallel(
                {
                    "eval": lambda: run_cli("eval", str(run_dir)),
                    "greedy_1": lambda: run_cli(*greedy),
                    "greedy_2": lambda: run_cli(*greedy),
                    "top_p_1": lambda: run_cli(*nucleus),
                    "top_p_2": lambda: run_cli(*nucleus),
                }
            )
        )
    results.update(run_dir=run_dir, data=data, prepared=prepared, ckpt=ckpt)
    return results


# ---- train ------------------------------------------------------------------------------------


def test_train_exits_zero_and_says_where_everything_is(cli):
    proc = cli["train"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, ckpt = cli["run_dir"], cli["ckpt"]
    lines = proc.stdout.strip().splitlines()
    done = [i for i, line in enumerate(lines) if line.startswith("Done: ")]
    assert done, proc.stdout
    assert lines[done[-1]].startswith(f"Done: step {STEPS}/{STEPS}, train loss ")
    summary = "\n".join(lines[done[-1] :])
    assert re.search(rf"run directory\s+{re.escape(str(run))}$", summary, re.M)
    assert re.search(rf"metrics\s+{re.escape(str(run / 'metrics.jsonl'))}$", summary, re.M)
    assert f"tensorboard --logdir {run / 'tb'}" in summary
    assert re.search(rf"checkpoint\s+{re.escape(str(ckpt))}$", summary, re.M)
    resume = [line for line in lines[done[-1] :] if line.strip().startswith("resume")]
    assert resume and f"hybridtron train tiny trainer.run_dir={run}" in resume[0]
    assert f"hybridtron eval {ckpt}" in summary
    assert f"hybridtron generate {ckpt}" in summary


def test_run_directory_layout(cli):
    assert cli["train"].returncode == 0
    run = cli["run_dir"]
    assert (run / "config.yaml").is_file()
    assert "max_steps: 6" in (run / "config.yaml").read_text()
    checkpoints = run / "checkpoints"
    steps = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
    assert steps == ["step_00000003", "step_00000006"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"
    for step in steps:
        names = {p.name for p in (checkpoints / step).iterdir()}
        assert {
            "model.safetensors",
            "optimizer.pt",
            "state.pt",
            "config.yaml",
            "manifest.json",
        } <= names
    assert not list(checkpoints.glob("*.tmp"))


def test_metrics_jsonl(cli):
    assert cli["train"].returncode == 0
    rows = [
        json.loads(line) for line in (cli["run_dir"] / "metrics.jsonl").read_text().splitlines()
    ]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))  # log_every=1
    for row in train_rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"} <= set(row)
        assert all(math.isfinite(row[k]) for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
        assert row["tokens"] == row["step"] * 8 * TINY_SEQ_LEN  # global batch 8 x seq_len
    assert [r["step"] for r in eval_rows] == [3, 6]
    assert all(math.isfinite(r["eval/loss"]) for r in eval_rows)
    # Training works at all: the loss goes down from the first step.
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    # The warm-up (2 steps) takes the lr up to its peak (tiny recipe: 3e-3) and cosine brings it down.
    lrs = [r["lr"] for r in train_rows]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] < lrs[1]


def test_tensorboard_events(cli):
    assert cli["train"].returncode == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cli["run_dir"] / "tb"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "train/loss" in scalars and "eval/loss" in scalars
    assert {"train/lr", "train/grad_norm"} <= set(scalars)
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, STEPS + 1))
    rows = [
        json.loads(line) for line in (cli["run_dir"] / "metrics.jsonl").read_text().splitlines()
    ]
    jsonl_losses = [r["loss"] for r in rows if "loss" in r]
    assert [e.value for e in losses] == pytest.approx(jsonl_losses, rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6]


# ---- eval and generate ------------------------------------------------------------------------


def test_eval_prints_a_finite_held_out_loss(cli):
    proc = cli["eval"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"held-out loss (\S+),", proc.stdout)
    assert match, proc.stdout
    loss = float(match.group(1))
    assert math.isfinite(loss)
    assert 0 < loss < math.log(257) + 1  # near or below a uniform guess after 6 steps
    # Given the run directory, eval picks its newest checkpoint.
    assert f"checkpoint {cli['ckpt']} (step {STEPS})" in proc.stdout
    assert str(cli["data"]) in proc.stdout


def test_greedy_generation_is_deterministic_and_continues_the_prompt(cli):
    first, second = cli["greedy_1"], cli["greedy_2"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert first.stdout == second.stdout
    assert first.stdout.startswith(PROMPT)


def test_top_p_generation_is_deterministic_for_a_seed(cli):
    first, second = cli["top_p_1"], cli["top_p_2"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == second.stdout
    assert first.stdout.startswith(PROMPT)
    assert len(first.stdout.rstrip("\n")) > len(PROMPT)  # it sampled something


# ---- help, prepare-data, registry -------------------------------------------------------------


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help(cli, sub):
    proc = cli[f"help_{sub}"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: hybridtron {sub}")
    assert "--help" in proc.stdout
    assert proc.stderr == ""


def test_help_describes_each_subcommand(cli):
    assert "--dry-run" in cli["help_train"].stdout
    assert "--resume-from" in cli["help_train"].stdout
    assert "--prompt" in cli["help_generate"].stdout and "--top-p" in cli["help_generate"].stdout
    assert "--samples" in cli["help_eval"].stdout
    assert "--overwrite" in cli["help_prepare-data"].stdout
    assert "list" in cli["help_registry"].stdout


def test_prepare_data_writes_a_manifest_and_refuses_to_overwrite(cli):
    first, again, other = cli["prepare"]
    prepared = cli["prepared"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"in {prepared}" in first.stdout
    manifest = json.loads((prepared / "hybridtron_data.json").read_text())
    assert manifest["dataset"] == "stdlib" and manifest["tokenizer"] == "byte"
    assert manifest["seq_len"] == 256  # the default trainer.seq_len
    assert manifest["splits"]["train"]["samples"] > 0 and manifest["splits"]["eval"]["samples"] > 0
    assert manifest["characters"] < 100_000  # data.max_bytes=50000 capped the corpus
    assert (prepared / "train" / "index.json").is_file() and (
        prepared / "eval" / "index.json"
    ).is_file()
    assert not Path(f"{prepared}.tmp").exists()

    assert again.returncode == 0 and "up to date" in again.stdout
    assert json.loads((prepared / "hybridtron_data.json").read_text()) == manifest

    assert other.returncode == 1
    line = one_line(other.stderr)
    assert line.startswith("hybridtron prepare-data: error: ")
    assert str(prepared) in line and "--overwrite" in line
    assert other.stdout == ""


def test_registry_list_shows_every_kind(cli):
    proc = cli["registry"]
    assert proc.returncode == 0, proc.stderr
    headers = {
        line.split(":")[0]: line for line in proc.stdout.splitlines() if not line.startswith(" ")
    }
    assert set(KINDS) <= set(headers)
    for kind in KINDS:
        assert f"[entry points: hybridtron.{kind}]" in headers[kind]
    entries = [line.split() for line in proc.stdout.splitlines() if line.startswith("  ")]
    names = {parts[0] for parts in entries}
    assert {
        "attention",
        "mlp",
        "sdpa",
        "plain",
        "none",
        "adamw",
        "cosine",
        "byte",
        "stdlib",
    } <= names
    assert all(len(parts) > 1 for parts in entries), "a plugin without a doc line"


def test_registry_list_unknown_kind_fails_cleanly(cli):
    proc = cli["registry_nope"]
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert line.startswith("hybridtron registry: error: ")
    assert "'nope'" in line
    assert all(kind in line for kind in KINDS)  # it lists the kinds there are
    assert proc.stdout == ""
