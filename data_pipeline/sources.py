"""Reading documents from files: .txt/.md, .jsonl (also .gz / .zst) and .parquet.

Inputs are files, directories (searched recursively) or glob patterns, expanded in a fixed,
sorted order. A bad record (invalid JSON, a missing text field, a file that is not UTF-8 text, a
truncated archive, a parquet file without the text column) is an error naming the file and line,
or, with ``skip_bad``, is skipped and counted. Files that directories and globs bring in but
that hold no text, or are of an unknown type, are skipped and counted (an empty file named
directly is an error).
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


KNOWN_TYPES = ".txt/.md, .jsonl/.json (optionally .gz or .zst) or .parquet"
_EXAMPLES = 5


@dataclass
class IngestReport:
    """What reading the inputs left out, with a few examples of each.

    ``skipped``: bad records and bad files (with --skip-bad); ``empty_files``: files without
    any text; ``other_files``: files of an unknown type that a directory or glob brought in.
    """

    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    empty_files: int = 0
    empty_examples: list[str] = field(default_factory=list)
    other_files: int = 0
    other_examples: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < _EXAMPLES:
            self.skipped_examples.append(f"{where}: {why}")

    def skip_empty(self, path: Path) -> None:
        self.empty_files += 1
        if len(self.empty_examples) < _EXAMPLES:
            self.empty_examples.append(str(path))

    def skip_other(self, path: Path) -> None:
        self.other_files += 1
        if len(self.other_examples) < _EXAMPLES:
            self.other_examples.append(str(path))

    def summary(self) -> list[str]:
        """One line per kind of input left out (none: nothing was)."""
        lines = []
        if self.skipped:
            lines.append(
                f"skipped {self.skipped} bad record(s) or file(s) (--skip-bad), "
                f"e.g. {self.skipped_examples[0]}"
            )
        if self.empty_files:
            lines.append(
                f"skipped {self.empty_files} empty file(s) (no text), "
                f"e.g. {', '.join(self.empty_examples[:3])}"
            )
        if self.other_files:
            lines.append(
                f"skipped {self.other_files} file(s) of unknown type (inputs are {KNOWN_TYPES}), "
                f"e.g. {', '.join(self.other_examples[:3])}"
            )
        return lines


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


def expand_inputs(inputs: list[str], report: IngestReport | None = None) -> list[Path]:
    """Files named by ``inputs`` (files, directories, globs), sorted, without duplicates.

    Files of an unknown type inside a directory or a glob's matches are left out and counted in
    ``report``; one named directly is an error.
    """
    if not inputs:
        raise UserError("no input given: name files, directories or globs (data.inputs)")
    files: list[Path] = []
    others: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            if _kind(path) is None:
                raise UserError(f"{path}: unknown file type; use {KNOWN_TYPES}")
            files.append(path)
            continue
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file())
        elif glob.has_magic(item):
            candidates = sorted(Path(p) for p in glob.glob(item, recursive=True))
            candidates = [p for p in candidates if p.is_file()]
        else:
            raise UserError(f"input {item!r} does not exist; check the path")
        found = [p for p in candidates if _kind(p)]
        if not found:
            what = "holds" if path.is_dir() else "matches"
            ignored = f" (only {len(candidates)} file(s) of other types)" if candidates else ""
            raise UserError(f"input {item!r} {what} no {KNOWN_TYPES} file{ignored}")
        files.extend(found)
        others.extend(p for p in candidates if not _kind(p))
    if report is not None:
        for other in dict.fromkeys(others):
            report.skip_other(other)
    return list(dict.fromkeys(files))


def named_files(inputs: list[str]) -> set[Path]:
    """The inputs that name a file directly (not through a directory or a glob)."""
    return {Path(item) for item in inputs if Path(item).is_file()}


class _BadFile(Exception):
    """A whole file that cannot be read (its message says why)."""


def _file_bytes(path: Path, data: bytes) -> bytes:
    """The file's content, decompressed when its name says .gz or .zst."""
    if path.suffix.lower() == ".gz":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:  # EOFError: a truncated file
            raise _BadFile(f"not a valid gzip file ({exc})") from None
    if path.suffix.lower() == ".zst":
        import zstd

        try:
            return zstd.decompress(data)
        except zstd.Error as exc:
            raise _BadFile(f"not a valid zstd file ({exc})") from None
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
        raise _BadFile(f"not a readable parquet file ({exc})") from None
    if text_field not in table.schema_arrow.names:
        columns = ", ".join(table.schema_arrow.names)
        raise _BadFile(
            f"no column {text_field!r} (columns: {columns}); choose one with --text-field"
        )
    try:
        batches = list(table.iter_batches(columns=[text_field]))
    except Exception as exc:  # read before yielding: a bad file adds no document at all
        raise _BadFile(f"not a readable parquet file ({exc})") from None
    for batch in batches:
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def hash_files(files: list[Path]) -> list[dict]:
    """Path, size and xxh64 of each file: what makes a prepared data set reproducible."""
    return [{"path": str(p), "bytes": p.stat().st_size, "xxh64": file_xxh64(p)} for p in files]


def _file_docs(path: Path, text_field: str, report: IngestReport, skip_bad: bool) -> Iterator[str]:
    kind = _kind(path)
    if kind == "parquet":
        return _parquet_docs(path, text_field)
    data = _file_bytes(path, path.read_bytes())
    if kind == "text":
        return _text_docs(path, data, report, skip_bad)
    return _jsonl_docs(path, data, text_field, report, skip_bad)


def read_documents(
    files: list[Path],
    text_field: str,
    report: IngestReport,
    skip_bad: bool,
    named: set[Path] | frozenset[Path] = frozenset(),
) -> Iterator[str]:
    """Every document of every file, in order.

    A file without any text is an error when it is in ``named`` (the user asked for it), else it
    is skipped and counted; so is a bad file with ``skip_bad``.
    """
    for path in files:
        skipped_before, yielded = report.skipped, 0
        try:
            for doc in _file_docs(path, text_field, report, skip_bad):
                yielded += 1
                yield doc
        except _BadFile as exc:
            if not skip_bad:
                raise UserError(f"{path}: {exc}; remove it or pass --skip-bad") from None
            report.skip(str(path), str(exc))
            continue
        if yielded or report.skipped > skipped_before:
            continue  # it had text, or its bad records are counted already
        if path in named and not skip_bad:
            raise UserError(f"{path} is empty (no text); remove it from the inputs")
        report.skip_empty(path)
