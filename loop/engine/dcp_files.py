"""FSDP2's checkpoint files, torch.distributed.checkpoint (DCP) as the loop writes and reads it: the engine's
`Layout` (every process writes `dcp/__RANK_0.distcp`, the first the `dcp/.metadata` index), the writer and
reader held to the loop's rules, and the streaming reader of the weights that consolidation uses.

DCP's own reader unpickles `.metadata` with plain `pickle.load` and every non-tensor value (an optimizer's
hyperparameters) with `torch.load(weights_only=False)`: either runs whatever a tampered file names. Here the
index is read by an unpickler that allows only DCP's own metadata classes, and the values with
`weights_only=True`. DCP's writer stamps the index with the folder's path and a random save id, so the same
state would give other bytes each time; the loop's writer leaves them out, and a checkpoint written after a
resume has the very digests of the uninterrupted run's.

DCP loads into whatever sharding the loading run has, so resuming on another number of processes needs no
conversion: `reshard` only links the files beside the checkpoint, with an RNG state for every new process.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from loop.config import first_line
from loop.engine.interface import Weights
from loop.engine.safe_load import ConsolidationError, UntrustedCheckpoint

FOLDER = "dcp"  # inside a checkpoint: DCP's files
INDEX = ".metadata"
MODEL, OPTIMIZER, ALIASES = "model", "optimizer", "aliases"  # the top-level keys the engine saves
METADATA_MODULE = "torch.distributed.checkpoint.metadata"
ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
           ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


def shard_file(rank: int) -> str:
    return f"{FOLDER}/__{rank}_0.distcp"


def recognises(names: list[str]) -> bool:
    return f"{FOLDER}/{INDEX}" in names


def rank_of(name: str) -> int | None:
    """The process that wrote a DCP data file (its rank is in the name); None for the index and any other."""
    found = re.fullmatch(rf"{FOLDER}/__(\d+)_\d+\.distcp", name)
    return int(found.group(1)) if found else None


def missing(folder: Path, world_size: int) -> list[str]:
    """The index and every process's data file, where they are not there."""
    wanted = [f"{FOLDER}/{INDEX}", *(shard_file(r) for r in range(world_size))]
    return [name for name in wanted if not (folder / name).is_file()]


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's index: its own metadata classes, torch's sizes and dtypes, nothing else."""

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata  # noqa: F401 - the module the index names

        if module == METADATA_MODULE and isinstance(getattr(torch.distributed.checkpoint.metadata, name, None), type):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def read_index(folder: Path):
    """A DCP folder's metadata, unpickled with only DCP's classes allowed (UntrustedCheckpoint says why not)."""
    path = folder / INDEX
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - a tampered or truncated index shows up in many ways
        raise UntrustedCheckpoint(f"{path}: unreadable, truncated or not plain data (DCP's metadata only; "
                                  f"{type(e).__name__}: {str(e)[:200]})") from None
    if type(metadata).__name__ != "Metadata" or not isinstance(metadata.storage_data, dict):
        raise UntrustedCheckpoint(f"{path}: not DCP's metadata")
    return metadata


def unreadable(path: Path) -> str | None:
    """Why the index of a DCP folder, or one of its data files, cannot be trusted (None: it reads, or `path` is
    neither). A digest only proves that a file is what the manifest says, and a manifest can be rewritten with
    it: each item of a data file is read here as the loader reads it, so that verification refuses what resume
    would (DCP's own planner reads the optimizer's values with `torch.load(weights_only=False)`)."""
    name = f"{path.parent.name}/{path.name}"
    if name != f"{FOLDER}/{INDEX}" and rank_of(name) is None:
        return None
    try:
        metadata = read_index(path.parent)
    except UntrustedCheckpoint as e:
        return str(e) if path.name == INDEX else None  # a data file's index says it once, in its own line
    return None if path.name == INDEX else _unreadable_items(path, metadata)


def _unreadable_items(path: Path, metadata) -> str | None:
    """The first item the index places in data file `path` that does not load as plain data (each item is a
    torch.save archive of its own, loaded here on the meta device: its pickle is read, not its numbers)."""
    from torch.distributed.checkpoint.utils import _create_file_view  # DCP's own view of one item in a file

    with open(path, "rb") as f:
        for index, info in metadata.storage_data.items():
            if info.relative_path != path.name:
                continue
            try:
                torch.load(_create_file_view(f, info.offset, info.length), map_location="meta", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a tampered or cut item shows up in many ways
                named = [line.strip() for line in str(e).splitlines() if "unsupported global" in line.lower()]
                return (f"{path}: {index.fqn} is unreadable, truncated or not plain data ({type(e).__name__}: "
                        f"{named[0][:200] if named else first_line(e, 200)})")
    return None


def writer(folder: Path):
    """DCP's file writer without the path and random id it stamps into the index (see the module's docstring)."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def storage_meta(self):
            return None

    return Writer(folder)


def reader(folder: Path):
    """DCP's file reader with the index read by `read_index`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_index(Path(self.path))
            metadata.storage_meta = StorageMeta(load_id=self.load_id)
            return metadata

    return Reader(folder)


def planner():
    """DCP's load planner with every non-tensor value read by `torch.load(weights_only=True)`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise UntrustedCheckpoint(f"{read_item.dest_index.fqn}: not plain data ({type(e).__name__}: "
                                          f"{str(e)[:200]})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return Planner()


def load(state: dict, folder: Path, **kwargs) -> None:
    """dcp.load through `reader` and `planner`; what they refuse comes back as UntrustedCheckpoint (DCP wraps every
    process's error in one CheckpointException with their tracebacks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=reader(folder), planner=planner(), **kwargs)
    except CheckpointException as e:
        said = re.search(r"(\S+: (?:unreadable, truncated or not plain data|not plain data)[^\n;]*(?:;[^\n;]*\))?)",
                         str(e))
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][-300:]  # the tracebacks' last line: one line
        raise UntrustedCheckpoint(said.group(1) if said else f"{folder}: cannot be loaded ({last})") from None


def _read_item(folder: Path, info: Any, fd_cache: dict[str, int]) -> bytes:
    """One stored item's bytes (`info`: DCP's _StorageInfo), each data file opened once per pass."""
    fd = fd_cache.get(info.relative_path)
    if fd is None:
        fd = fd_cache[info.relative_path] = os.open(folder / info.relative_path, os.O_RDONLY)
    data = os.pread(fd, info.length, info.offset)
    if len(data) != info.length:
        raise ConsolidationError(f"{folder / info.relative_path}: truncated (short read at byte {info.offset})")
    return data


def _load(data: bytes, where: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConsolidationError(f"{where}: unreadable or not plain data ({type(e).__name__}: {str(e)[:200]})") \
            from None


def weights(ckpt: Path) -> Weights:
    """The model's weights, one whole tensor at a time, each put together from its chunks (every process's
    shard of it) read straight from the data files; the tied weights the engine recorded are left out."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    folder = ckpt / FOLDER
    if not (ckpt / "config.json").is_file():
        raise ConsolidationError(f"{ckpt / 'config.json'}: missing; the checkpoint has no model config to write")
    if not (folder / INDEX).is_file():
        raise ConsolidationError(f"{folder / INDEX}: missing; an FSDP2 checkpoint holds its index there")
    try:
        metadata = read_index(folder)
    except UntrustedCheckpoint as e:
        raise ConsolidationError(str(e)) from None
    entries = metadata.state_dict_metadata
    aliases: dict[str, str] = {}
    fds: dict[str, int] = {}
    try:
        for key, entry in entries.items():
            if key.startswith(f"{ALIASES}.") and not isinstance(entry, TensorStorageMetadata):
                info = metadata.storage_data[MetadataIndex(key)]
                target = _load(_read_item(folder, info, fds), str(folder / info.relative_path))
                aliases[key.removeprefix(f"{ALIASES}.")] = str(target)
    finally:
        for fd in fds.values():
            os.close(fd)
    prefix = f"{MODEL}."
    tensors = {name: e for k, e in entries.items() if k.startswith(prefix) and isinstance(e, TensorStorageMetadata)
               and (name := k.removeprefix(prefix)) not in aliases}
    if not tensors:
        raise ConsolidationError(f"{folder / INDEX}: no model weights in it; unknown layout")
    shapes = {k: (tuple(e.size), e.properties.dtype) for k, e in tensors.items()}

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        fds: dict[str, int] = {}
        try:
            for name, entry in tensors.items():
                whole = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
                for chunk in entry.chunks:
                    info = metadata.storage_data[MetadataIndex(prefix + name, chunk.offsets)]
                    piece = _load(_read_item(folder, info, fds), str(folder / info.relative_path))
                    if tuple(piece.shape) != tuple(chunk.sizes):
                        raise ConsolidationError(f"{folder / info.relative_path}: {name} holds {tuple(piece.shape)}, "
                                                 f"its index says {tuple(chunk.sizes)}")
                    whole[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = piece
                yield name, whole
        finally:
            for fd in fds.values():
                os.close(fd)

    return Weights(stream, shapes, aliases)


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def reshard(accelerator, ckpt: Path, folder: Path) -> None:
    """What a run of another number of processes loads: DCP's files as they are (DCP reshards on load), linked,
    and the RNG state of every new process (that of the old process of its rank modulo the old count)."""
    written_by = len(list((ckpt / FOLDER).glob("__*_0.distcp")))
    (folder / FOLDER).mkdir(parents=True)
    for path in (ckpt / FOLDER).iterdir():
        link_or_copy(path, folder / FOLDER / path.name)
    for rank in range(accelerator.num_processes):
        shutil.copyfile(ckpt / f"rng_state_{rank % written_by}.safetensors", folder / f"rng_state_{rank}.safetensors")
