"""Writing and reading boxes of dense tensors with `torch.distributed.checkpoint` (DCP).

Each rank saves the boxes it holds (`Chunk`: a key, the dense shape, the box's offsets and its
data) and a few small objects; DCP gathers the ranks' plans on the coordinator, drops boxes
several ranks declare alike (replicated weights: each is written once, spread over the ranks),
checks that the boxes of every tensor tile it exactly (no overlap, nothing missing) and writes
``__{rank}_0.distcp`` per rank plus ``.metadata`` (every box's dense offsets under its key).
Reading asks for any boxes of any keys; DCP reads the overlapping parts of the saved boxes,
whatever layout wrote them. Keys follow torch's own state-dict naming (`model.<name>`,
`optim.state.<name>.<state key>`), so DCP's tools (``dcp_to_torch_save``) read it too.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

METADATA_FILE = ".metadata"
DATA_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


@dataclass(frozen=True)
class Chunk:
    """A box of dense tensor ``key`` (shape ``shape``) at ``offsets``; ``data``'s shape is the
    box's sizes."""

    key: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    data: torch.Tensor


class _ChunkSavePlanner(DefaultSavePlanner):
    """Plans the given chunks and objects instead of a state dict's tensors; DCP's global plan
    (dedup of alike boxes, the tiling check, the metadata) is the default planner's."""

    def __init__(self, chunks: list[Chunk], objects: dict[str, Any]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        if len(self.chunks) != len(chunks):
            raise ValueError("two chunks of one rank share a key and offsets")
        self.objects = objects

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(c.offsets), c.data.shape),
                    properties=TensorProperties.create_from_tensor(c.data),
                    size=torch.Size(c.shape),
                ),
            )
            for c in self.chunks.values()
        ]
        items += [
            WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self.objects
        ]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        index = write_item.index
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save(self.objects[index.fqn], buffer)
            return buffer
        return self.chunks[(index.fqn, tuple(index.offset))].data.contiguous()


def save_chunks(
    directory: Path,
    chunks: list[Chunk],
    objects: dict[str, Any],
    group: dist.ProcessGroup | None = None,
) -> list[str]:
    """Write this rank's ``chunks`` and ``objects`` into ``directory`` (a collective over
    ``group``; None: this process alone); returns the names of the files this rank wrote.

    A write that fails on any rank fails on every rank (DCP shares the outcome): the rank that
    failed raises its own error, the others return (the caller's error exchange reports it)."""
    writer = FileSystemWriter(directory, single_file_per_rank=True, sync_files=True)
    planner = _ChunkSavePlanner(chunks, objects)
    rank = 0 if group is None else dist.get_rank(group)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(
                {},
                storage_writer=writer,
                planner=planner,
                process_group=group,
                no_dist=group is None,
            )
    except CheckpointException as exc:
        own = exc.failures.get(rank)
        if own is None:
            return []
        raise getattr(own, "exc", None) or RuntimeError(str(own)) from None
    written = [p.name for p in directory.iterdir() if _data_rank(p.name) == rank]
    return sorted(written) + ([METADATA_FILE] if rank == 0 else [])


def _data_rank(name: str) -> int | None:
    match = DATA_FILE.match(name)
    return int(match.group(1)) if match else None


def read_metadata(directory: Path) -> Metadata:
    return FileSystemReader(directory).read_metadata()


class _CachedReader(FileSystemReader):
    """A reader that does not read ``.metadata`` again for every load."""

    def __init__(self, directory: Path, metadata: Metadata) -> None:
        super().__init__(directory)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:
        return self._metadata


class _BoxLoadPlanner(LoadPlanner):
    """Fills the given destination views: key -> [(dense offsets, view)]; objects by key."""

    def __init__(
        self, wants: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]], objects: list[str]
    ) -> None:
        self.wants, self.object_keys, self.objects = wants, objects, {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, boxes in self.wants.items():
            md = self.metadata.state_dict_metadata[key]
            local = [ChunkStorageMetadata(torch.Size(o), view.shape) for o, view in boxes]
            items += create_read_items_for_chunk_list(key, md, local)
        items += [_byte_read(key) for key in self.object_keys]
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.objects[read_item.dest_index.fqn] = torch.load(value, weights_only=False)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        _, view = self.wants[read_item.dest_index.fqn][read_item.dest_index.index]
        for dim, (start, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is in place


def _byte_read(key: str) -> ReadItem:
    return ReadItem(
        type=LoadItemType.BYTE_IO,
        dest_index=MetadataIndex(key),
        dest_offsets=torch.Size((0,)),
        storage_index=MetadataIndex(key),
        storage_offsets=torch.Size((0,)),
        lengths=torch.Size((0,)),
    )


def load_boxes(
    directory: Path,
    metadata: Metadata,
    wants: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]],
    objects: list[str] = (),
) -> dict[str, Any]:
    """Fill each destination view in ``wants`` (key -> [(dense offsets, view)]) from the saved
    boxes that overlap it, in this process alone; returns the ``objects`` asked for."""
    planner = _BoxLoadPlanner(wants, list(objects))
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(
            {}, storage_reader=_CachedReader(directory, metadata), planner=planner, no_dist=True
        )
    return planner.objects


def tensor_metadata(metadata: Metadata, key: str) -> TensorStorageMetadata | None:
    md = metadata.state_dict_metadata.get(key)
    return md if isinstance(md, TensorStorageMetadata) else None


def model_key(name: str) -> str:
    return f"model.{name}"


def moment_key(name: str, state: str) -> str:
    return f"optim.state.{name}.{state}"


STEP_KEY = "optim.step"  # the optimizer's step count (an object)
PARAM_GROUPS_KEY = "optim.param_groups"  # one process: the torch optimizer's groups, by name
SCALARS_KEY = "optim.scalars"  # one process: per-parameter state that is not a moment tensor
