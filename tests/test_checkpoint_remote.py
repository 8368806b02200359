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
