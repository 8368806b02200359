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
from trainer.checkpoint import verify_checkpoint
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
