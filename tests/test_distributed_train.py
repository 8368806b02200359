"""`hybridtron train --nproc-per-node N`: real multi-process runs over gloo, their sharded
checkpoints, resuming them under other layouts, and what happens when a rank dies."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open

from arch.model import lm_loss
from tests.conftest import cli_in_background, logged_losses, run_cli, tiny_run_args, wait_until
from trainer.checkpoint import (
    CheckpointReader,
    load_pretrained,
    resolve_checkpoint,
    verify_checkpoint,
)
from trainer.checkpoint.dcp_io import DATA_FILE, read_metadata

# A checkpoint resumed under another layout trains steps 3-4 with other reduction orders:
# measured <= 9.3e-8 relative in the losses (1 and 2 threads, ATen default kernels with
# MKL_CBWR=COMPATIBLE), so 1e-5 leaves > 100x.
TOLERANCE = 1e-5
# A hybrid that TP=2 can split (heads, kv heads, Mamba d_inner, MoE experts), PP=2 cuts at `|`,
# and Hugging Face's Jamba can express (mixer / FFN pairs, no RoPE, plain residual).
MODEL = [
    "model.pattern=*-|ME",
    "model.attention.rope=false",
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.moe.num_experts=4",
]


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", *tiny_run_args(data, run_dir, *MODEL, *extra)]


def train(data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = run_cli(*train_args(data, run_dir, *extra), env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tp2_pp2_run(tiny_data, tmp_path_factory) -> Path:
    """4 steps at tp 2 x pp 2 (4 ranks), checkpoints at steps 2 and 4. Step 2's is written in
    the background (`trainer.checkpoint_async`): every resume below starts from it, and the
    same-layout resume continues bit for bit."""
    run = tmp_path_factory.mktemp("dist") / "tp2pp2"
    layout = ("parallel.tensor=2", "parallel.pipeline=2", "--nproc-per-node", "4")
    proc = train(tiny_data, run, *layout, "trainer.checkpoint_async=true")
    assert "dp 1 x pp 2 x tp 2" in proc.stdout + proc.stderr
    return run


def test_sharded_checkpoint_layout(tp2_pp2_run):
    ckpt = verify_checkpoint(tp2_pp2_run / "checkpoints" / "step_00000002")
    assert ckpt.layout == {"tp": 2, "pp": 2, "dp": 1}
    names = {p.name for p in ckpt.path.iterdir()}
    parts = {f"__{r}_0.distcp" for r in range(4)} | {".metadata"}  # each rank's boxes
    assert parts | {f"rng-rank{r}.pt" for r in range(4)} <= names
    dense = CheckpointReader(ckpt).model_state()  # from the four ranks' boxes
    assert (
        dense["layers.2.inner.in_proj.weight"].shape[0] == 2 * 64
    )  # [x; z] of d_inner 64, whole again
    assert set(logged_losses(tp2_pp2_run)) == {1, 2, 3, 4}


@pytest.mark.parametrize(
    "layout",
    [
        ("same layout", ["parallel.tensor=2", "parallel.pipeline=2", "--nproc-per-node", "4"]),
        ("dp2 with ep2", ["--nproc-per-node", "2", "parallel.expert=2"]),  # experts split
    ],
    ids=lambda v: v[0],
)
def test_resume_under_another_layout_continues_the_run(tp2_pp2_run, tiny_data, tmp_path, layout):
    name, extra = layout
    step2 = tp2_pp2_run / "checkpoints" / "step_00000002"
    run = tmp_path / "resumed"
    proc = train(tiny_data, run, f"trainer.resume_from={step2}", *extra)
    assert "[resume]" in proc.stdout + proc.stderr
    want, got = logged_losses(tp2_pp2_run), logged_losses(run)
    assert set(got) == {3, 4}
    for step in (3, 4):
        if name == "same layout":  # exact resume: bit for bit
            assert got[step] == want[step]
        else:
            assert abs(got[step] - want[step]) / want[step] <= TOLERANCE, (name, step, got, want)
    if "ep2" in name:
        assert_expert_checkpoint_reshards(run, tp2_pp2_run)


def assert_expert_checkpoint_reshards(ep_run: Path, tp2_pp2_run: Path) -> None:
    """Each expert rank of a dp 2 x ep 2 run writes its own experts under their dense names
    (the rest once, by one of the two); read back whole (one process), they hold the model
    the tp 2 x pp 2 run holds after the same steps."""
    step4 = verify_checkpoint(ep_run / "checkpoints" / "step_00000004")
    assert step4.layout == {"tp": 1, "pp": 1, "dp": 2, "ep": 2}
    experts = {0: set(), 1: set()}
    for key, item in read_metadata(step4.path).storage_data.items():
        if ".inner.experts." in key.fqn and key.fqn.startswith("model."):
            rank = int(DATA_FILE.match(item.relative_path).group(1))
            experts[rank].add(key.fqn.split(".")[5])
    assert experts == {0: {"0", "1"}, 1: {"2", "3"}}  # 4 experts: a block each
    got = load_pretrained(step4.path)
    want = load_pretrained(tp2_pp2_run / "checkpoints" / "step_00000004")
    assert got.state_dict().keys() == want.state_dict().keys()
    # The same 4 steps under two layouts: the weights AdamW barely moved (near-zero gradients,
    # sign-like steps) differ by up to lr, so compare what the model computes. Measured: loss
    # 1.7e-7 apart, logits 3.9e-5 of their largest value.
    ids = torch.randint(0, 200, (4, 17), generator=torch.Generator().manual_seed(0))
    losses = [lm_loss(m(ids[:, :-1]), ids[:, 1:]).item() for m in (got, want)]
    assert abs(losses[0] - losses[1]) / losses[1] <= TOLERANCE, losses


def test_eval_and_export_accept_a_sharded_checkpoint(tp2_pp2_run, tmp_path):
    step4 = tp2_pp2_run / "checkpoints" / "step_00000004"
    proc = run_cli("eval", str(step4))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out loss" in proc.stdout
    proc = run_cli("export-hf", str(step4), str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported, merged = load_pretrained(tmp_path / "hf"), load_pretrained(step4)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exported(ids), merged(ids), rtol=1e-5, atol=1e-5)


def test_checkpoint_convert_writes_one_model_file_without_the_optimizer(
    tp2_pp2_run, tmp_path, monkeypatch
):
    """`hybridtron checkpoint convert`: the four ranks' dense weights in one safetensors or
    torch file (model config and step inside); no optimizer state is ever read."""
    import trainer.checkpoint.reader_dcp as reader_dcp
    from launch.convert import convert_checkpoint

    step4 = tp2_pp2_run / "checkpoints" / "step_00000004"
    want = CheckpointReader(verify_checkpoint(step4)).model_state()
    real, read = reader_dcp.load_boxes, []

    def load_boxes(directory, metadata, wants, objects=()):
        read.extend([*wants, *objects])
        return real(directory, metadata, wants, objects)

    monkeypatch.setattr(reader_dcp, "load_boxes", load_boxes)
    single = convert_checkpoint(step4, "safetensors", tmp_path / "model.safetensors")
    with safe_open(single, "pt") as f:
        assert set(f.keys()) == set(want)
        assert all(torch.equal(f.get_tensor(k), want[k]) for k in want)
        meta = f.metadata()
    assert json.loads(meta["hybridtron_model_config"])["pattern"] == "*-|ME" and meta["step"] == "4"
    saved = torch.load(convert_checkpoint(tp2_pp2_run, "torch", tmp_path / "model.pt"))  # newest
    assert saved["step"] == 4 and saved["model_config"]["d_model"] == 32
    assert all(torch.equal(saved["model"][k], want[k]) for k in want)
    assert read and all(key.startswith("model.") for key in read), sorted(set(read))[-3:]
    proc = run_cli("checkpoint", "convert", str(step4), "--to", "torch", str(tmp_path / "model.pt"))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"hybridtron checkpoint: error: {tmp_path / 'model.pt'} already exists; give a new output file"
    ]


def test_export_consolidates_a_sharded_checkpoint_into_one_process(tp2_pp2_run, tmp_path):
    step4 = tp2_pp2_run / "checkpoints" / "step_00000004"
    out = tmp_path / "export"
    proc = run_cli("export", str(step4), str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 1 and "exported" in proc.stdout
    exported, sharded = (
        CheckpointReader(resolve_checkpoint(out)),
        CheckpointReader(resolve_checkpoint(step4)),
    )
    assert not exported.checkpoint.sharded and exported.checkpoint.step == 4
    want, got = sharded.model_state(), exported.model_state()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert exported.optimizer_step() == sharded.optimizer_step()
    for name, _ in load_pretrained(out).named_parameters():
        a, b = exported.moments(name), sharded.moments(name)
        assert b and set(a) == set(b), name  # exp_avg, exp_avg_sq
        assert all(torch.equal(a[k], b[k]) for k in b), name
    assert exported.trainer_state()["step"] == sharded.trainer_state()["step"] == 4
    # Never into a directory that holds something: one line, exit != 0.
    proc = run_cli("export", str(step4), str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "already holds checkpoints" in lines[0]


def test_a_dead_rank_stops_every_rank_and_keeps_the_checkpoints(tiny_data, tmp_path):
    """SIGKILL one of two pipeline ranks mid-run: the job ends non-zero within the collective
    timeout, the survivor names itself and the operation, the newest checkpoint is intact."""
    run = tmp_path / "killed"
    args = train_args(tiny_data, run, "parallel.pipeline=2", "parallel.timeout_s=10")
    args = [a for a in args if not a.startswith("trainer.max_steps")] + ["trainer.max_steps=400"]
    step4 = run / "checkpoints" / "step_00000004"
    with cli_in_background(*args, "--nproc-per-node", "2", env={"OMP_NUM_THREADS": "1"}) as job:
        wait_until(job, step4.exists, 300, "checkpoint at step 4")
        victim = next(
            p for p in psutil.Process(job.pid).children() if p.environ().get("RANK") == "1"
        )
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 10 + 15 + 20  # timeout + grace + start-up slack
    assert "rank 1 of 2 failed (was killed by SIGKILL)" in stderr, stderr[-1500:]
    survivor = [line for line in stderr.splitlines() if "rank 0 (dp 0, pp 0, tp 0)" in line]
    assert survivor, stderr[-3000:]
    assert "failed" in survivor[0] or "did not finish" in survivor[0], survivor[0]
    newest = sorted((run / "checkpoints").glob("step_????????"))[-1]
    assert verify_checkpoint(newest).step >= 4


def test_bf16_pipeline_run_matches_one_process_bf16(tiny_data, tmp_path):
    """bf16 autocast over fp32 master weights: pp 2 trains as one process does in bf16."""
    piped, single = tmp_path / "pp2", tmp_path / "single"
    extra = ("trainer.precision=bf16", "trainer.checkpoint_every=0", "trainer.max_steps=3")
    train(tiny_data, piped, *extra, "parallel.pipeline=2", "--nproc-per-node", "2")
    train(tiny_data, single, *extra)
    want, got = logged_losses(single), logged_losses(piped)
    assert set(got) == {1, 2, 3}
    for step in got:
        assert abs(got[step] - want[step]) / want[step] <= 1e-4, (step, got, want)


def test_pc_layer_vectors_travel_in_sharded_checkpoints(tiny_data, tmp_path):
    """The PC layer's power-iteration vectors (u, v: buffers, not parameters) are model state: a
    tp 2 checkpoint holds them, loads strictly in one process and resumes there like the run."""
    pc = ["model.preconditioner.name=pc", "model.preconditioner.options={level: 2}"]
    whole = tmp_path / "tp2"
    train(tiny_data, whole, *pc, "parallel.tensor=2", "--nproc-per-node", "2")
    step2 = whole / "checkpoints" / "step_00000002"
    state = CheckpointReader(verify_checkpoint(step2)).model_state()
    vectors = [name for name in state if name.endswith((".u", ".v"))]
    assert vectors and all(torch.isfinite(state[n]).all() for n in vectors), sorted(state)[:8]
    load_pretrained(step2)  # strict: every parameter and buffer of the model is there
    run = tmp_path / "resumed"
    train(tiny_data, run, *pc, f"trainer.resume_from={step2}")
    want, got = logged_losses(whole), logged_losses(run)
    assert set(got) == {3, 4}
    for step in (3, 4):
        assert abs(got[step] - want[step]) / want[step] <= TOLERANCE, (step, got, want)


def test_interleaved_pipeline_resumes_a_checkpoint_and_writes_the_same_model(tiny_data, tmp_path):
    """Checkpoints keep dense names whatever the chunks: a pp 2 checkpoint resumed with 2
    virtual stages (4 chunks, interleaved 1F1B) continues with the same losses, and its own
    checkpoint holds the same model as the uninterrupted pp 2 run's."""
    flat = ("model.pattern=*-ME", "parallel.pipeline=2", "--nproc-per-node", "2")  # no '|'
    plain, interleaved = tmp_path / "pp2", tmp_path / "pp2_v2"
    train(tiny_data, plain, *flat)
    step2 = plain / "checkpoints" / "step_00000002"
    proc = train(
        tiny_data, interleaved, *flat, "parallel.virtual_stages=2", f"trainer.resume_from={step2}"
    )
    assert "[resume]" in proc.stdout + proc.stderr
    want, got = logged_losses(plain), logged_losses(interleaved)
    assert set(got) == {3, 4}
    for step in (3, 4):
        assert abs(got[step] - want[step]) / want[step] <= TOLERANCE, (step, got, want)
    # The step metrics show what interleaving saves: (P - 1) / (v m + P - 1), m = 4.
    rows = [json.loads(line) for line in (interleaved / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "loss" in row][-1]
    assert logged["pipeline/bubble"] == pytest.approx(1 / 9)
    assert logged["pipeline/bubble_1f1b"] == pytest.approx(1 / 5)
    ours, theirs = (
        CheckpointReader(verify_checkpoint(run / "checkpoints" / "step_00000004")).model_state()
        for run in (interleaved, plain)
    )
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=TOLERANCE, atol=1e-6, msg=name)
