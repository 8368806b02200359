"""trainer/checkpoint/remote.py against a local S3-compatible server (moto, on 127.0.0.1,
started here as tests/test_remote_data.py does): upload manifest-last, discovery of complete
checkpoints only, download + verification, retention, and a server that dies mid-upload."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import tiny_config
from trainer import Trainer
from trainer.checkpoint import CheckpointError, verify_checkpoint
from trainer.checkpoint.format import MANIFEST
from trainer.checkpoint.remote import S3Checkpoints


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the local S3 server did not start")
            time.sleep(0.2)


@pytest.fixture()
def server(monkeypatch):
    from launch.spawn import free_port

    port = free_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    proc = start_server(port)
    yield proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_data):
    run = tmp_path_factory.mktemp("remote") / "run"
    Trainer(tiny_config(run, tiny_data, max_steps=6, checkpoint_every=2)).fit()
    return run / "checkpoints"


def test_upload_discover_download_and_prune(server, local_run, tmp_path):
    store = S3Checkpoints("s3://ckpts/runs/a")
    store.client.create_bucket(Bucket="ckpts")
    for name in ("step_00000002", "step_00000004", "step_00000006"):
        assert store.upload(local_run / name) == f"s3://ckpts/runs/a/{name}"
    latest = store.client.get_object(Bucket="ckpts", Key="runs/a/latest")["Body"].read()
    assert latest == b"step_00000006"
    # An upload cut short (no manifest yet) is not a checkpoint.
    store.client.put_object(Bucket="ckpts", Key="runs/a/step_00000008/model.safetensors", Body=b"x")
    assert store.complete() == ["step_00000002", "step_00000004", "step_00000006"]
    got = store.download("step_00000006", tmp_path / "local")
    assert verify_checkpoint(got).step == 6
    assert (got / MANIFEST).read_bytes() == (local_run / "step_00000006" / MANIFEST).read_bytes()
    assert store.prune(keep=2) == ["step_00000002"]
    assert store.complete() == ["step_00000004", "step_00000006"]


def test_a_server_that_dies_mid_upload_leaves_the_previous_checkpoint_whole(
    server, local_run, tmp_path
):
    store = S3Checkpoints("s3://ckpts/run")
    store.client.create_bucket(Bucket="ckpts")
    store.upload(local_run / "step_00000004")
    real = store.client.upload_file
    calls = []

    def dying(path, bucket, key):
        calls.append(key)
        if len(calls) == 2:  # the server goes away halfway through step 6's files
            server.kill()
            server.wait()
        return real(path, bucket, key)

    store.client.upload_file = dying
    with pytest.raises(Exception):  # noqa: B017 (botocore's connection error; wrapped later)
        store.upload(local_run / "step_00000006")
    assert not any(k.endswith(MANIFEST) for k in calls)  # the manifest never went up


def test_a_run_checkpoints_to_s3_and_resumes_from_there_on_a_fresh_machine(
    server, tiny_data, tmp_path
):
    import shutil

    from trainer.checkpoint import completed_checkpoints

    store = S3Checkpoints("s3://ckpts/job")
    store.client.create_bucket(Bucket="ckpts")
    whole = Trainer(tiny_config(tmp_path / "whole", tiny_data, max_steps=6, checkpoint_every=2))
    want = whole.fit().losses
    url = {"checkpoint_dir": "s3://ckpts/job", "keep_checkpoints": 1}
    first = tiny_config(tmp_path / "a", tiny_data, max_steps=6, checkpoint_every=2, **url)
    first.trainer.stop_at_step = 4  # the same schedule, stopped (as a pre-empted job)
    Trainer(first).fit()
    assert store.complete() == ["step_00000004"]  # uploaded, the older one pruned
    shutil.rmtree(tmp_path / "a")  # a new pod: nothing local
    cfg = tiny_config(tmp_path / "a", tiny_data, max_steps=6, checkpoint_every=2, **url)
    got = Trainer(cfg).fit().losses
    assert {s: got[s] for s in (5, 6)} == {s: want[s] for s in (5, 6)}
    assert [p.name for p in completed_checkpoints(tmp_path / "a" / "checkpoints")][-1] == (
        "step_00000006"
    )
    assert store.complete() == ["step_00000006"]


def test_an_unreachable_store_stops_the_run_with_one_line(server, tiny_data, tmp_path, monkeypatch):
    """At the start (cannot list) and mid-run (the server dies before an upload): one line
    each, and the local copy of the checkpoint stays complete."""
    from trainer.checkpoint import CheckpointError, CheckpointWriteError

    S3Checkpoints("s3://ckpts/job").client.create_bucket(Bucket="ckpts")
    real = S3Checkpoints.upload

    def dying(self, local):
        server.kill()
        server.wait()
        return real(self, local)

    monkeypatch.setattr(S3Checkpoints, "upload", dying)
    cfg = tiny_config(tmp_path / "b", tiny_data, max_steps=2, checkpoint_every=2)
    cfg.trainer.checkpoint_dir = "s3://ckpts/job"
    with pytest.raises(CheckpointWriteError) as info:
        Trainer(cfg).fit()
    message = str(info.value)
    assert message.startswith("uploading checkpoint step_00000002 to s3://ckpts/job failed")
    assert "the local copy" in message and "\n" not in message
    verify_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000002")
    with pytest.raises(CheckpointError, match="cannot read the checkpoint store s3://ckpts/job"):
        Trainer(cfg).fit()  # the store is still down


def test_two_nodes_without_a_shared_volume_checkpoint_to_and_resume_from_the_store(
    server, tiny_data, tmp_path
):
    """Two ranks (tests/store_nodes_worker.py) train 4 steps staging in one run directory,
    step 4 is removed from the store, then they resume with a run directory each ("nodes"
    without a shared volume): each node downloads step 2, stages its part of step 4 and
    uploads it, rank 0 commits the manifest; the losses are the uninterrupted run's."""
    import os

    from launch.spawn import free_port
    from tests.conftest import REPO, logged_losses, tiny_run_args

    store = S3Checkpoints("s3://ckpts/nodes")
    store.client.create_bucket(Bucket="ckpts")
    whole, nodes = tmp_path / "whole", [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    args = tiny_run_args(tiny_data, whole, "trainer.checkpoint_dir=s3://ckpts/nodes")
    port, procs = str(free_port()), []
    for rank, node in enumerate(nodes):  # LOCAL_RANK numbered on this host, as streaming's
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }  # fmt: skip  (shared memory is per host)
        cmd = [sys.executable, "-m", "tests.store_nodes_worker", str(whole), str(node),
               "step_00000004", *args]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    first, second = outs[0].split("[worker] run done")[:2]
    assert "node-local staging" not in first  # one run directory: rank 0 stages for both
    assert "[checkpoint] 2 node-local staging directories" in second
    assert second.count("[resume] downloading s3://ckpts/nodes/step_00000002") == 1
    assert "hybridtron eval s3://ckpts/nodes/step_00000004" in second  # only the store has it
    assert "[resume]" not in outs[1]  # rank 1 prints nothing, but its node has the download:
    assert verify_checkpoint(nodes[1] / "checkpoints" / "step_00000002").step == 2
    want = logged_losses(whole)
    assert logged_losses(nodes[0]) == {s: want[s] for s in (3, 4)}
    # Step 4 went up in two parts (rank 1's RNG from node 1), the staging copies are gone.
    assert store.complete() == ["step_00000002", "step_00000004"]
    got = store.download("step_00000004", tmp_path / "fetched")
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= {p.name for p in got.iterdir()}
    assert not list((nodes[1] / "checkpoints").glob("step_00000004*"))


def test_eval_generate_and_exports_read_a_checkpoint_from_the_store(
    server, tiny_data, tmp_path, monkeypatch, capsys
):
    """`eval s3://...` (a prefix: its newest complete checkpoint; or .../step_N) gives the
    local copy's loss; generate, export-hf, checkpoint convert and trainer.resume_from take the
    URL too; a missing
    bucket, an incomplete checkpoint and a store that is down are one line each."""
    from launch.cli import main

    monkeypatch.setenv("HYBRIDTRON_CACHE", str(tmp_path / "cache"))
    S3Checkpoints("s3://ckpts/e").client.create_bucket(Bucket="ckpts")
    cfg = tiny_config(tmp_path / "run", tiny_data, max_steps=2, checkpoint_dir="s3://ckpts/e")
    Trainer(cfg).fit()

    def loss_of(source: str) -> str:
        assert main(["eval", source]) == 0
        return capsys.readouterr().out.split("held-out loss ")[1]

    local_copy = str(tmp_path / "run" / "checkpoints" / "step_00000002")
    local = loss_of(local_copy)
    assert loss_of("s3://ckpts/e") == local
    weights = tmp_path / "cache" / "s3" / "ckpts" / "e" / "step_00000002" / "__0_0.distcp"
    stamp = weights.stat().st_mtime_ns
    assert loss_of("s3://ckpts/e/step_00000002/") == local
    assert weights.stat().st_mtime_ns == stamp  # the cached copy, verified, reused
    weights.write_bytes(weights.read_bytes()[:-8])  # damaged: downloaded again
    assert loss_of("s3://ckpts/e") == local and weights.stat().st_mtime_ns != stamp
    assert main(["generate", "s3://ckpts/e", "--prompt", "def ", "--max-new-tokens", "3"]) == 0
    assert main(["export-hf", "s3://ckpts/e", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    out = str(tmp_path / "model.safetensors")
    assert main(["checkpoint", "convert", "s3://ckpts/e", "--to", "safetensors", out]) == 0
    capsys.readouterr()
    # trainer.resume_from takes the URL: the same step 3 as resuming from the local copy.
    steps = {}
    for name, source in (("from_s3", "s3://ckpts/e/step_00000002"), ("from_disk", local_copy)):
        resumed = tiny_config(tmp_path / name, tiny_data, max_steps=3, resume_from=source)
        steps[name] = Trainer(resumed).fit().losses
    assert set(steps["from_s3"]) == {3} and steps["from_s3"] == steps["from_disk"]
    nothing = tiny_config(tmp_path / "none", tiny_data, max_steps=3, resume_from="s3://ckpts/no")
    with pytest.raises(CheckpointError, match="holds no complete hybridtron checkpoint"):
        Trainer(nothing).fit()
    capsys.readouterr()
    for source, problem in (
        ("s3://nobucket/x", "cannot read the checkpoint store s3://nobucket/x (NoSuchBucket"),
        ("s3://ckpts/e/step_00000009", "is not a complete checkpoint in the store"),
        ("s3://ckpts/none", "holds no complete hybridtron checkpoint"),
    ):
        assert main(["eval", source]) == 1
        err = capsys.readouterr().err.strip()
        assert problem in err and "\n" not in err, err
    server.kill()
    server.wait()
    assert main(["eval", "s3://ckpts/elsewhere"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot read the checkpoint store" in err and "AWS_ENDPOINT_URL" in err, err


def test_two_ranks_resume_from_a_checkpoint_in_the_store(server, tiny_data, tmp_path, monkeypatch):
    """`trainer.resume_from=s3://.../step_N` at pp 2 from a one-process run's stored
    checkpoint: rank 0 downloads it into the cache, rank 1 uses that copy, and steps 3-4
    continue the run (another layout: within 1e-5, as in test_distributed_train)."""
    from tests.conftest import logged_losses, run_cli, tiny_run_args
    from tests.test_distributed_train import MODEL, TOLERANCE

    monkeypatch.setenv("HYBRIDTRON_CACHE", str(tmp_path / "cache"))
    S3Checkpoints("s3://ckpts/r").client.create_bucket(Bucket="ckpts")
    env = {"OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    args = tiny_run_args(tiny_data, whole, *MODEL, "trainer.checkpoint_dir=s3://ckpts/r")
    proc = run_cli("train", *args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    source = "trainer.resume_from=s3://ckpts/r/step_00000002"
    layout = ("parallel.pipeline=2", "--nproc-per-node", "2")
    proc = run_cli("train", *tiny_run_args(tiny_data, resumed, *MODEL, source, *layout), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = logged_losses(resumed), logged_losses(whole)
    assert set(got) == {3, 4}
    for step in (3, 4):
        assert abs(got[step] - want[step]) / want[step] <= TOLERANCE, (step, got, want)
    assert verify_checkpoint(tmp_path / "cache" / "s3" / "ckpts" / "r" / "step_00000002").step == 2
