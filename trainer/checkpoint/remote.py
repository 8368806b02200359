"""Checkpoints mirrored to an S3-compatible object store (``s3://bucket/prefix``).

`trainer.checkpoint_dir: s3://...` (issue 15 point 4), used by the Trainer. The design keeps every
guarantee of the local format by staging: a checkpoint is written and completed locally as
today (``step_N.tmp`` -> manifest -> ``step_N``), then uploaded file by file under
``prefix/step_N/`` with ``manifest.json`` last, then ``prefix/latest`` is rewritten. So an upload
cut short (a dead server, a pre-emption) leaves a prefix without a manifest, which discovery
never takes for a checkpoint, and the previous checkpoint stays whole. Resuming downloads the
newest complete one into the local staging directory and verifies it there (sizes, xxh64).

Endpoint and credentials come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ...,
``AWS_ENDPOINT_URL`` or ``S3_ENDPOINT_URL`` for a non-AWS server), as for the data pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

from trainer.checkpoint.format import (
    LATEST,
    MANIFEST,
    STEP_DIR,
    Checkpoint,
    CheckpointError,
    verify_checkpoint,
)

SCHEME = "s3://"


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without trailing slash) of ``s3://bucket/prefix``."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", url)
    if match is None or not match.group(1):
        raise CheckpointError(f"{url!r} is not an s3://bucket/prefix URL")
    return match.group(1), match.group(2).rstrip("/")


class S3Checkpoints:
    """The checkpoints under ``url`` (s3://bucket/prefix)."""

    def __init__(self, url: str, client=None) -> None:
        import boto3

        self.url = url.rstrip("/")
        self.bucket, self.prefix = split_url(url)
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
        self.client = client or boto3.client("s3", endpoint_url=endpoint)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def upload(self, local: Path) -> str:
        """Upload the complete local checkpoint ``local`` (``.../step_N``): every file, the
        manifest last, then ``latest``; returns its URL."""
        verify_checkpoint(local)
        files = sorted(p.name for p in local.iterdir() if p.name != MANIFEST)
        self.upload_files(local, local.name, files)
        return self.commit(local.name, (local / MANIFEST).read_bytes())

    def upload_files(self, directory: Path, name: str, files: list[str]) -> None:
        """Upload ``files`` of ``directory`` under checkpoint ``name``'s prefix: one node's
        part of a checkpoint whose nodes stage it on their own disks (no manifest yet)."""
        for file in files:
            self.client.upload_file(str(directory / file), self.bucket, self._key(name, file))

    def commit(self, name: str, manifest: bytes) -> str:
        """Mark checkpoint ``name`` complete: its manifest (every part must be uploaded
        already), then ``latest``; returns its URL."""
        self.client.put_object(Bucket=self.bucket, Key=self._key(name, MANIFEST), Body=manifest)
        self.client.put_object(Bucket=self.bucket, Key=self._key(LATEST), Body=name.encode())
        return f"{self.url}/{name}"

    def _step_prefixes(self) -> list[str]:
        """Every ``step_N`` prefix, complete or not, oldest first."""
        top = f"{self.prefix}/" if self.prefix else ""
        names = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=top, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                if STEP_DIR.match(name):
                    names.append(name)
        return sorted(names)

    def _objects(self, name: str) -> list[str]:
        """The keys under checkpoint ``name``'s prefix."""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._key(name) + "/")
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError:
            return False

    def complete(self) -> list[str]:
        """The names of the complete checkpoints (their manifest uploaded), oldest first."""
        return [n for n in self._step_prefixes() if self._exists(self._key(n, MANIFEST))]

    def download(self, name: str, local_dir: Path) -> Path:
        """Checkpoint ``name`` into ``local_dir/name`` (through ``name.download``), verified."""
        return self.download_verified(name, local_dir).path

    def download_verified(self, name: str, local_dir: Path) -> Checkpoint:
        """`download`, returning the verified checkpoint (hashed once, before the rename)."""
        final, tmp = local_dir / name, local_dir / (name + ".download")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for key in self._objects(name):
            self.client.download_file(self.bucket, key, str(tmp / key.rsplit("/", 1)[-1]))
        checkpoint = verify_checkpoint(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return dataclasses.replace(checkpoint, path=final)

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` complete checkpoints (and any incomplete prefix
        older than the newest complete one); returns the deleted names."""
        done = self.complete()
        if not done:
            return []
        kept = set(done[-keep:])
        newest = done[-1]
        doomed = [n for n in self._step_prefixes() if n not in kept and n < newest]
        for name in doomed:
            keys = self._objects(name)
            for start in range(0, len(keys), 1000):  # delete_objects takes up to 1000 keys
                batch = [{"Key": k} for k in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
        return doomed


def cache_dir() -> Path:
    """Where checkpoints read from a store are kept: ``$HYBRIDTRON_CACHE`` or
    ``~/.cache/hybridtron`` (``$XDG_CACHE_HOME``), under ``s3/<bucket>/<prefix>``."""
    root = os.environ.get("HYBRIDTRON_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "hybridtron"


def _store_error(url: str, exc: Exception) -> CheckpointError:
    cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return CheckpointError(
        f"cannot read the checkpoint store {url} ({cause}); check AWS_ENDPOINT_URL, the "
        f"credentials and the bucket"
    )


def _locate(url: str) -> tuple[S3Checkpoints, str]:
    """(store, checkpoint name) of ``s3://bucket/prefix/step_N`` (that checkpoint, if the
    store marks it complete) or of ``s3://bucket/prefix`` (its newest complete checkpoint, or
    that of ``prefix/checkpoints``: a run's prefix under launch.storage)."""
    url = url.rstrip("/")
    parent, _, last = url.rpartition("/")
    if STEP_DIR.match(last) and parent != "s3:/":
        store = S3Checkpoints(parent)
        if not store._exists(store._key(last, MANIFEST)):
            raise CheckpointError(
                f"{url} is not a complete checkpoint in the store ({MANIFEST} missing: no such "
                f"checkpoint, or its upload was cut short); give {parent} for its newest "
                f"complete checkpoint"
            )
        return store, last
    for candidate in (url, f"{url}/checkpoints"):
        store = S3Checkpoints(candidate)
        done = store.complete()
        if done:
            return store, done[-1]
    raise CheckpointError(
        f"{url} holds no complete hybridtron checkpoint; give s3://bucket/prefix where a run "
        f"uploaded them (its trainer.checkpoint_dir) or .../step_N"
    )


def fetch_checkpoint(url: str, cache: Path | None = None) -> Checkpoint:
    """The local copy of the checkpoint ``url`` names (`_locate`), downloaded and verified
    into the cache (an earlier copy is reused when its manifest is the store's and it still
    verifies); a one-line CheckpointError for a missing bucket, an unreachable store or no
    complete checkpoint."""
    split_url(url)  # a malformed URL is one line before any connection
    try:
        store, name = _locate(url)
        local = (cache or cache_dir()) / "s3" / store.bucket / store.prefix
        cached = local / name / MANIFEST
        if cached.exists():
            stored = store.client.get_object(Bucket=store.bucket, Key=store._key(name, MANIFEST))
            if stored["Body"].read() == cached.read_bytes():  # not a re-written same step
                try:
                    return verify_checkpoint(local / name)
                except CheckpointError:
                    pass  # a damaged cached copy: download it again
        return store.download_verified(name, local)
    except CheckpointError:
        raise
    except Exception as exc:  # botocore's: connection, credentials, no such bucket
        raise _store_error(url, exc) from None
