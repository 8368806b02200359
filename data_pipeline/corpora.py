"""Built-in corpora (registry `dataset`): where documents come from."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from arch.registry import UserError
from data_pipeline.registries import DATASETS


def _capped(docs: Iterator[str], max_bytes: int | None) -> Iterator[str]:
    total = 0
    for doc in docs:
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(doc)
        yield doc


@DATASETS.register("stdlib")
def stdlib_corpus(source: str | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """Text that ships with Python: the documentation topics, then the top-level stdlib modules."""
    import pydoc_data.topics

    def docs() -> Iterator[str]:
        topics = pydoc_data.topics.topics
        for name in sorted(topics):
            yield topics[name]
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(stdlib.glob("*.py")):
            yield path.read_text(encoding="utf-8", errors="replace")

    return _capped(docs(), max_bytes)


def _require_source(source: str | None, kind: str) -> Path:
    if not source:
        raise UserError(
            f"data.dataset={kind} reads files: set data.source=PATH (file or directory)"
        )
    path = Path(source)
    if not path.exists():
        raise UserError(f"data.source {source!r} does not exist; point it at a file or directory")
    return path


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)


@DATASETS.register("text")
def text_corpus(source: str | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """Plain-text files (a file or a directory of *.txt / *.md): one document per file."""
    path = _require_source(source, "text")
    return _capped(
        (p.read_text(errors="replace") for p in _files(path, (".txt", ".md"))), max_bytes
    )


@DATASETS.register("jsonl")
def jsonl_corpus(source: str | None = None, max_bytes: int | None = None) -> Iterator[str]:
    """JSON-lines files with a "text" field: one document per line."""
    path = _require_source(source, "jsonl")

    def docs() -> Iterator[str]:
        for file in _files(path, (".jsonl",)):
            with open(file, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise UserError(
                            f"{file}:{line_no}: not a JSON object with a 'text' field ({exc}); "
                            f"fix or remove the line"
                        ) from None

    return _capped(docs(), max_bytes)
