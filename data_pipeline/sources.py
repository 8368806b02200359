"""Reading documents from files: .txt/.md, .jsonl (also .gz / .zst) and .parquet.

Inputs are files, directories (searched recursively) or glob patterns, expanded in a fixed,
sorted order. A bad record (invalid JSON, a missing text field, a file that is not UTF-8 text)
is an error naming the file and line, or, with ``skip_bad``, is skipped and counted.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from arch.registry import UserError
from data_pipeline.integrity import file_xxh64

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED = (".gz", ".zst")


@dataclass
class IngestReport:
    """Records skipped while reading the inputs (with --skip-bad), with a few examples."""

    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(f"{where}: {why}")


def _kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in TEXT_SUFFIXES:
        return "text"
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last in PARQUET_SUFFIXES:
        return "parquet"
    return None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by ``inputs`` (files, directories, globs), sorted, without duplicates."""
    if not inputs:
        raise UserError("no input given: name files, directories or globs (data.inputs)")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
        elif path.is_file():
            if _kind(path) is None:
                raise UserError(
                    f"{path}: unknown file type; use .txt/.md, .jsonl/.json (optionally .gz or "
                    f".zst) or .parquet"
                )
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if _kind(Path(p)))
        if not found:
            raise UserError(f"input {item!r} matches no .txt, .jsonl or .parquet file")
        files.extend(found)
    return list(dict.fromkeys(files))


def _file_bytes(path: Path, data: bytes) -> bytes:
    """The file's content, decompressed when its name says .gz or .zst."""
    if path.suffix.lower() == ".gz":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise UserError(f"{path}: not a valid gzip file ({exc})") from None
    if path.suffix.lower() == ".zst":
        import zstd

        try:
            return zstd.decompress(data)
        except zstd.Error as exc:
            raise UserError(f"{path}: not a valid zstd file ({exc})") from None
    return data


def _decode(path: Path, data: bytes) -> str | None:
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_docs(path: Path, data: bytes, report: IngestReport, skip_bad: bool) -> Iterator[str]:
    text = _decode(path, data)
    if text is None:
        if not skip_bad:
            raise UserError(f"{path}: not UTF-8 text (binary?); remove it or pass --skip-bad")
        report.skip(str(path), "not UTF-8 text")
        return
    if text.strip():
        yield text


def _jsonl_docs(
    path: Path, data: bytes, text_field: str, report: IngestReport, skip_bad: bool
) -> Iterator[str]:
    for line_no, raw in enumerate(io.BytesIO(data), 1):
        if not raw.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(raw)
            text = record[text_field]
            if not isinstance(text, str):
                raise TypeError(f"field {text_field!r} is {type(text).__name__}, not a string")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            why = (
                f"no field {text_field!r}"
                if isinstance(exc, KeyError)
                else f"{type(exc).__name__}: {exc}"
            )
            if not skip_bad:
                raise UserError(
                    f"{where}: {why}; fix the line, choose --text-field, or pass --skip-bad"
                ) from None
            report.skip(where, why)
            continue
        if text.strip():
            yield text


def _parquet_docs(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    if text_field not in table.schema_arrow.names:
        raise UserError(
            f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}); "
            f"choose one with --text-field"
        )
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def hash_files(files: list[Path]) -> list[dict]:
    """Path, size and xxh64 of each file: what makes a prepared data set reproducible."""
    return [{"path": str(p), "bytes": p.stat().st_size, "xxh64": file_xxh64(p)} for p in files]


def read_documents(
    files: list[Path], text_field: str, report: IngestReport, skip_bad: bool
) -> Iterator[str]:
    """Every document of every file, in order."""
    for path in files:
        raw = path.read_bytes()
        kind = _kind(path)
        if kind == "parquet":
            yield from _parquet_docs(path, text_field)
            continue
        data = _file_bytes(path, raw)
        if kind == "text":
            yield from _text_docs(path, data, report, skip_bad)
        else:
            yield from _jsonl_docs(path, data, text_field, report, skip_bad)
