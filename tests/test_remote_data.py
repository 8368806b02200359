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
from conftest import TINY_SEQ_LEN, run_cli, tiny_config

from data_pipeline import DataConfig, prepare_data
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


def test_cache_limit_evicts_shards_and_keeps_training(tmp_path):
    # ~40 shards of 16 KiB behind a cache of 1/3 of the split: used shards must be evicted while
    # the run goes on. Run as a subprocess with a timeout, so a stall fails instead of hanging.
    remote = tmp_path / "remote"
    prepare_data(DataConfig(path=str(remote), max_bytes=300_000, shard_size_bytes=1 << 14),
                 TINY_SEQ_LEN, progress=False)  # fmt: skip
    index = json.loads((remote / "train" / "index.json").read_text())
    split_bytes = sum(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in index["shards"])
    limit = split_bytes // 3
    cache, run = tmp_path / "cache", tmp_path / "run"
    proc = run_cli(
        "train", "tiny", f"trainer.run_dir={run}", f"data.path={cache}", f"data.remote={remote}",
        f"data.cache_limit={limit}b", f"trainer.seq_len={TINY_SEQ_LEN}", "trainer.max_steps=60",
        "trainer.micro_batch_size=8", "trainer.global_batch_size=8", "trainer.progress=false",
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    cached = sum(p.stat().st_size for p in (cache / "train").glob("shard.*"))
    # Streaming evicts before each download, but a resident shard it decompresses adds to the
    # cache without an eviction pass (StreamingDataset.prepare_shard's LOCAL branch), so the
    # cache may end one shard over the limit (seen once, in a full run with 1 thread): far below
    # the whole split all the same.
    largest = max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in index["shards"])
    assert 0 < cached <= limit + largest < split_bytes
