"""End to end through the real `hybridtron` CLI, in subprocesses, on the tiny data.

Each subprocess spends ~3 s importing torch, so the runs are batched: every command that does not
depend on another runs two at a time, in module-scoped fixtures, and the tests read the results.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY_SEQ_LEN, run_cli, tiny_run_args

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
    results.update(run_dir=run_dir, data=data, prepared=prepared, ckpt=ckpt, train_args=train_args)
    return results


def hint(stdout: str, name: str) -> list[str]:
    """The argv of the ``name`` command (resume, continue longer) a run printed at its end."""
    found = re.findall(rf"^  {name}\s+(hybridtron .*)$", stdout, re.M)
    assert len(found) == 1, stdout
    return shlex.split(found[0], comments=True)


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
    # The hints repeat the command that ran: the recipe and every override, in order.
    resume = hint(proc.stdout, "resume")
    assert resume == ["hybridtron", *cli["train_args"]]
    assert hint(proc.stdout, "continue longer") == [
        "hybridtron",
        *[a.replace(f"max_steps={STEPS}", f"max_steps={2 * STEPS}") for a in cli["train_args"]],
    ]
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
            ".metadata",
            "__0_0.distcp",
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


# ---- the resume / continue-longer hints: the command that ran, only what must change changed --


def test_hints_of_a_multi_process_run_with_a_recipe_and_overrides_run_as_printed(
    tmp_path, tiny_data
):
    """A 2-process run of the tiny recipe with overrides, stopped early at step 2 and with the
    recipe's warm-up (5) longer than its 4 steps; its printed "resume" command finishes it
    (from the step-2 checkpoint), and the next "continue longer" takes it to 8 steps."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)  # see `cli`: a private copy for the child processes
    run = tmp_path / "run dir"  # a space: the hints must quote it
    overrides = [a for a in tiny_run_args(data, run) if not a.startswith("optim.warmup_steps")]
    first = ["train", "tiny", *overrides, "model.pattern=*-*-", "trainer.stop_at_step=2",
             "--nproc-per-node", "2"]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1"}
    a = run_cli(*first, env=env, timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]
    assert "[config] optim.warmup_steps=5 is not shorter than trainer.max_steps=4" in a.stderr
    assert "Done: step 2/4" in a.stdout
    assert "warmup_steps: 3" in (run / "config.yaml").read_text()  # what the run used
    resume = hint(a.stdout, "resume")
    expected = ["hybridtron", *first]
    expected.remove("trainer.stop_at_step=2")  # the one key that must go: the rest is as typed
    assert resume == expected
    longer_a = hint(a.stdout, "continue longer")

    b = run_cli(*resume[1:], env=env, timeout=600)
    assert b.returncode == 0, b.stderr[-3000:]
    assert f"[resume] from {run / 'checkpoints' / 'step_00000002'} at step 2" in b.stdout
    assert "Done: step 4/4" in b.stdout
    longer = hint(b.stdout, "continue longer")
    assert longer == longer_a  # same run, same way to continue it
    assert "trainer.max_steps=8" in longer and "trainer.max_steps=4" not in longer
    assert "optim.warmup_steps=3" in longer  # no second warm-up in the longer run

    c = run_cli(*longer[1:], env=env, timeout=600)
    assert c.returncode == 0, c.stderr[-3000:]
    assert f"[resume] from {run / 'checkpoints' / 'step_00000004'} at step 4" in c.stdout
    assert "Done: step 8/8" in c.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(lrs) == list(range(1, 9))  # every step once
    peak = 3e-3  # the tiny recipe's optim.lr
    assert [lrs[s] for s in (1, 2, 3)] == pytest.approx([peak / 3, 2 * peak / 3, peak])
    assert lrs[5] <= lrs[4] and lrs[8] < lrs[5] < peak  # decaying from step 4 on: no new warm-up


def test_rerun_commands_replace_only_what_must_change(tmp_path):
    from launch.cli import rerun_commands
    from launch.config import load_config

    def hints(command: list[str]) -> tuple[list[str], list[str]]:
        recipe = command[1] if "=" not in command[1] else None
        overrides = [a for a in command[1:] if "=" in a]
        if "--nproc-per-node" in command:
            overrides.append(
                f"launch.nproc_per_node={command[command.index('--nproc-per-node') + 1]}"
            )
        cfg = load_config(recipe, overrides, note=None)
        resume, longer = rerun_commands(command, cfg)
        return shlex.split(resume), shlex.split(longer)

    # Overrides stay in order, quoted where the shell needs it; a repeated key is replaced once.
    resume, longer = hints(["train", "tiny", "trainer.max_steps=3", "model.pattern=*-*-",
                            "trainer.max_steps=40", "--nproc-per-node", "2"])  # fmt: skip
    assert resume == ["hybridtron", "train", "tiny", "trainer.max_steps=3", "model.pattern=*-*-",
                      "trainer.max_steps=40", "--nproc-per-node", "2"]  # fmt: skip
    assert longer == [
        "hybridtron",
        "train",
        "tiny",
        "model.pattern=*-*-",
        "trainer.max_steps=80",
        "--nproc-per-node",
        "2",
    ]  # fmt: skip (warm-up 5 < 39: not pinned)
    # trainer.resume_from / stop_at_step / resume=false would not go on from the newest checkpoint.
    resume, longer = hints(["train", "trainer.resume_from=/x/step_00000002", "trainer.max_steps=5",
                            "trainer.stop_at_step=2", "trainer.resume=false"])  # fmt: skip
    assert resume == ["hybridtron", "train", "trainer.max_steps=5", "trainer.resume=true"]
    assert longer == [
        "hybridtron",
        "train",
        "trainer.max_steps=10",
        "trainer.resume=true",
        "optim.warmup_steps=4",
    ]  # fmt: skip (the default 20, shortened to 4)
    # Set by the recipe: unset by an override.
    recipe = tmp_path / "stop.yaml"
    recipe.write_text("trainer:\n  max_steps: 50\n  stop_at_step: 10\n")
    resume, _ = hints(["train", str(recipe)])
    assert resume == ["hybridtron", "train", str(recipe), "trainer.stop_at_step=null"]
    # Ray: submit with its options.
    resume, longer = hints(["submit", "tiny", "trainer.max_steps=40", "--address",
                            "http://head:8265", "--num-workers", "2", "--gpus-per-worker", "1"])  # fmt: skip
    assert resume == ["hybridtron", "submit", "tiny", "trainer.max_steps=40", "--address",
                      "http://head:8265", "--num-workers", "2", "--gpus-per-worker", "1"]  # fmt: skip
    assert longer[:4] == ["hybridtron", "submit", "tiny", "trainer.max_steps=80"]


def test_ray_worker_hints_submit_the_resolved_config(tmp_path):
    # A Ray worker that was not given the command line: `submit` of the run's config.yaml,
    # which holds every key the run had (so nothing the user typed is lost).
    from launch.cli import _resolved_submit_command, rerun_commands
    from launch.config import load_config, to_yaml

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("tiny", [f"trainer.run_dir={run}", "trainer.resume_from=/old/step_2",
                               "model.d_model=32"], note=None)  # fmt: skip
    (run / "config.yaml").write_text(to_yaml(cfg))
    resume, longer = rerun_commands(_resolved_submit_command(cfg, 2), cfg)
    assert shlex.split(resume) == ["hybridtron", "submit", str(run / "config.yaml"),
                                   "trainer.resume_from=null", "--num-workers", "2"]  # fmt: skip
    assert "trainer.max_steps=60" in shlex.split(longer)
    again = load_config(str(run / "config.yaml"), ["trainer.resume_from=null"], note=None)
    assert again.model.d_model == 32 and again.trainer.resume_from is None
