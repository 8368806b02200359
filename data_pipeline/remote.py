"""Prepared data on a remote (another directory, or s3:// and the other stores streaming knows).

Shards are streamed into ``data.path`` (the local cache) by StreamingDataset itself; the small
files around them (the manifest, the tokenizer) are fetched here with streaming's downloaders,
so a run on a fresh node needs only ``data.remote``. An S3-compatible endpoint is chosen with
the ``S3_ENDPOINT_URL`` environment variable (credentials as boto3 reads them).
"""

from __future__ import annotations

from pathlib import Path

from arch.registry import UserError
from data_pipeline.streaming_compat import CloudDownloader


def fetch_file(remote: str, name: str, local_dir: Path, *, required: bool) -> bool:
    """Copy ``remote/name`` to ``local_dir/name`` unless it is there; False if the remote lacks it."""
    target = local_dir / name
    if target.exists():
        return True
    local_dir.mkdir(parents=True, exist_ok=True)
    source = f"{remote.rstrip('/')}/{name}"
    try:
        CloudDownloader.get(source).download(source, str(target))
    except FileNotFoundError:
        if required:
            raise UserError(
                f"{source} does not exist; is data.remote the prepared directory?"
            ) from None
        return False
    except Exception as exc:  # each store raises its own types (botocore, google, ...)
        if any(hint in str(exc).lower() for hint in ("404", "not found", "nosuchkey")):
            if required:
                raise UserError(
                    f"{source} does not exist; is data.remote the prepared directory?"
                ) from None
            return False
        raise UserError(f"cannot fetch {source}: {exc}") from None
    return True
