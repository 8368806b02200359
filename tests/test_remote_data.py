"""Streaming prepared data from a remote: another directory, and a real S3 server on 127.0.0.1.

The S3 server is moto's standalone server (an S3-compatible HTTP endpoint, started here as its
own process); boto3 and streaming talk to it over HTTP exactly as they would to S3 or MinIO.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_config

from trainer import Trainer


def losses(tmp_path: Path, name: str, data_path: Path, **data_options) -> dict[int, float]:
    cfg = tiny_config(tmp_path / name, data_path, max_steps=4)
    for key, value in data_options.items():
        setattr(cfg.data, key, value)
    return Trainer(cfg).fit().losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_directory_remote_streams_the_same_samples(tmp_path, tiny_data):
    remote = tmp_path / "remote"
    shutil.copytree(tiny_data, remote, ignore=shutil.ignore_patterns("*.mds"))
    reference = losses(tmp_path, "local", remote)
    cache = tmp_path / "cache"
    streamed = losses(tmp_path, "streamed", cache, remote=str(remote), cache_limit="1mb")
    assert streamed == reference
    assert (cache / "hybridtron_data.json").exists()  # fetched next to the cached shards
    assert list((cache / "train").glob("shard.*"))


@pytest.fixture()
def s3_server(monkeypatch):
    import boto3

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    deadline = time.time() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the local S3 server did not start")
            time.sleep(0.2)
    yield boto3.client("s3", endpoint_url=endpoint)
    proc.terminate()
    proc.wait(timeout=30)


def test_s3_remote_streams_the_same_samples(tmp_path, tiny_data, s3_server):
    s3_server.create_bucket(Bucket="corpus")
    for file in sorted(tiny_data.rglob("*")):
        if file.is_file() and file.suffix != ".mds":  # upload what prepare-data wrote
            s3_server.upload_file(str(file), "corpus", f"tiny/{file.relative_to(tiny_data)}")
    reference = losses(tmp_path, "local", tiny_data)
    cache = tmp_path / "cache"
    assert losses(tmp_path, "s3", cache, remote="s3://corpus/tiny") == reference
    assert list((cache / "train").glob("shard.*.mds*"))


def test_cache_limit_evicts_shards_and_keeps_training(tmp_path, tiny_data):
    # tiny_data has ~16 KiB shards (~120 KiB decompressed in all): a 100 KiB cache cannot hold
    # them all (streaming wants at least 4 shards' room), so used shards are evicted while the
    # run goes on, and the samples stay the same.
    remote = tmp_path / "remote"
    shutil.copytree(tiny_data, remote, ignore=shutil.ignore_patterns("*.mds"))
    shards = list((remote / "train").glob("shard.*.mds.zstd"))
    assert len(shards) >= 4
    reference = losses(tmp_path, "local", remote)
    cache = tmp_path / "cache"
    cfg = tiny_config(tmp_path / "limited", cache, max_steps=40)
    cfg.data.remote, cfg.data.cache_limit = str(remote), "100kb"
    streamed = Trainer(cfg).fit().losses
    assert {k: v for k, v in streamed.items() if k <= 4} == reference
    raw_total = sum(json.loads((remote / "train" / "index.json").read_text())["shards"][i]["raw_data"]["bytes"]
                    for i in range(len(shards)))  # fmt: skip
    assert raw_total > 100 * 1024  # the whole split would not fit
    cached = sum(p.stat().st_size for p in (cache / "train").glob("shard.*"))
    assert cached <= 100 * 1024
