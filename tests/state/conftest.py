"""Corrupted checkpoints of every kind a fault injector tried (issue 25), made at test time from real runs: a
one-process run without DeepSpeed (`single_process_run`), the shared 2-process ZeRO-3 run (`trained_run`) and the
2-process FSDP2 run of tests/state (`fsdp2_reference`, here so that its one launch serves every file of them).

`corrupted(engine, kind)` copies the run's two checkpoints into a fresh checkpoints/ folder and breaks the newer
one; what the checkpoint's verification must then say about it is `expected`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loop.engine import dcp_files
from loop.engine.zero3_files import torch_load
from loop.state import integrity
from tests.conftest import launch, write_config

OPTIM = "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
MODEL_STATES = "pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt"
# For each engine: the file holding the weights, the optimizer's, a file of another process, the older checkpoint.
FILES = {"single": {"weights": "model.safetensors", "optimizer": "optimizer.bin", "other": "rng_state_0.safetensors",
                    "older": "step_00000002", "newer": "step_00000004"},
         "zero3": {"weights": OPTIM, "optimizer": OPTIM, "other": "rng_state_1.safetensors", "older": "step_00000008",
                   "newer": "step_00000016"},
         # DCP: each process's data file holds its shards of the model and of the optimizer's moments; the optimizer's
         # other values (its param_groups, what DCP unpickles) are written once, into the second process's file.
         "fsdp2": {"weights": "dcp/__0_0.distcp", "optimizer": "dcp/__1_0.distcp", "other": "dcp/__1_0.distcp",
                   "older": "step_00000009", "newer": "step_00000010"}}
STEPS, SAVE_EVERY = 10, 3  # 6 steps per epoch on the 160-dialogue file of `small_data`


@pytest.fixture(scope="session")
def small_data(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckdata") / "small.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in corpus[:160]))
    return path


def config(tmp: Path, tiny_dir: Path, data_file: Path, out: Path) -> Path:
    return write_config(tmp / f"{out.name}.yaml", tiny_dir, out,
                        data={"train_files": [str(data_file)], "seq_len": 128},
                        training={"max_steps": STEPS, "save_every": SAVE_EVERY, "log_every": 1,
                                  "keep_last": 10, "eval_every": 0})


@pytest.fixture(scope="session")
def fsdp2_reference(tiny_dir, small_data, tmp_path_factory) -> Path:
    """The uninterrupted run of test_checkpoints.py under 2-process FSDP2 (checkpoints at steps 3, 6, 9 and 10),
    shared by the FSDP2 tests of resume there and by the integrity proofs of test_integrity.py: one launch."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    launch(config(tmp, tiny_dir, small_data, tmp / "ref"), accelerate_config="cpu_fsdp2.yaml")
    return tmp / "ref"


class Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rewrite_manifest(ckpt: Path, *names: str) -> None:
    """Record the files' new sizes and digests, as a careful attacker (or a bug that writes both) would."""
    manifest = json.loads((ckpt / integrity.MANIFEST).read_text())
    for name in names:
        path = ckpt / name
        manifest["files"][name] = {"size": path.stat().st_size, integrity.ALGORITHM: integrity.digest(path)}
    (ckpt / integrity.MANIFEST).write_text(json.dumps(manifest))


def dcp_items(path: Path, within: str, tensors: bool) -> list[tuple[str, object]]:
    """(name, DCP's _StorageInfo: offset and length in the file) of each item that DCP's index places in data file
    `path` under top-level key `within`: its float32 tensors', or (tensors=False) its other values'."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = dcp_files.read_index(path.parent)
    found = []
    for key, info in index.storage_data.items():
        entry = index.state_dict_metadata[key.fqn]
        is_tensor = isinstance(entry, TensorStorageMetadata)
        wanted = is_tensor and entry.properties.dtype == torch.float32 if tensors else not is_tensor
        if info.relative_path == path.name and key.fqn.startswith(f"{within}.") and wanted:
            found.append((key.fqn, info))
    return found


def largest_float_tensor(path: Path, within: str = dcp_files.MODEL) -> tuple[int, int]:
    """(byte offset, byte length) of the largest float32 tensor's data in a safetensors or torch file, or in a DCP
    data file among the tensors under `within` (each item there is a torch.save archive of its own)."""
    if path.suffix == ".distcp":
        from torch.distributed.checkpoint.utils import _create_file_view

        _, info = max(dcp_items(path, within, tensors=True), key=lambda item: item[1].length)
        with open(path, "rb") as f:
            t = torch.load(_create_file_view(f, info.offset, info.length), map_location="meta", weights_only=True)
        return info.offset + t.untyped_storage()._checkpoint_offset + t.storage_offset() * 4, t.numel() * 4
    if path.suffix == ".safetensors":
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        spans = [tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"]
        start, end = max(spans, key=lambda s: s[1] - s[0])
        return 8 + n + start, end - start
    tensors = []

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor) and obj.dtype == torch.float32:
            tensors.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(torch_load(path, meta=True))
    t = max(tensors, key=lambda t: t.numel())
    return t.untyped_storage()._checkpoint_offset + t.storage_offset() * 4, t.numel() * 4


def flip_bytes(path: Path, within: str = dcp_files.MODEL) -> None:
    """64 bytes inverted in the middle of the largest tensor: same size, same format, other numbers."""
    offset, length = largest_float_tensor(path, within)
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        chunk = f.read(64)
        f.seek(offset + length // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def as_49152(path: Path) -> None:
    """4,096 weights rewritten as 49152.0, in place."""
    offset, length = largest_float_tensor(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(torch.full((min(4096, length // 4),), 49152.0).numpy().tobytes())


def payload(path: Path, marker: Path) -> None:
    torch.save({"optimizer_state_dict": Payload(marker), "module": Payload(marker), "state": Payload(marker)}, path)


def dcp_payload(path: Path, marker: Path) -> None:
    """A pickle that runs a command, in place of the optimizer's first value that is not a tensor (its weight
    decay) in a DCP data file, as long as what it replaces: DCP's own load planner reads those values with
    torch.load(weights_only=False), which runs it."""
    _, info = dcp_items(path, dcp_files.OPTIMIZER, tensors=False)[0]
    code = pickle.dumps(Payload(marker), protocol=2)
    assert len(code) <= info.length
    with open(path, "r+b") as f:
        f.seek(info.offset)
        f.write(code.ljust(info.length, b"\0"))


def set_state(ckpt: Path, **changes) -> None:
    state = json.loads((ckpt / "loop_state.json").read_text()) | changes
    (ckpt / "loop_state.json").write_text(json.dumps(state))
    rewrite_manifest(ckpt, "loop_state.json")


@dataclass
class Corrupted:
    root: Path  # a checkpoints/ folder: the intact older checkpoint and the broken newer one
    broken: Path
    intact: Path
    expected: str  # what the problem line says, after the file's path
    file: str  # the file it names
    marker: Path  # created if anything is ever unpickled


def _break(kind: str, ckpt: Path, files: dict, marker: Path) -> tuple[str, str]:
    """Break `ckpt` the way `kind` says; return (the file named, what is said about it)."""
    weights, optimizer, other = files["weights"], files["optimizer"], files["other"]
    if kind == "flipped weights":
        flip_bytes(ckpt / weights)
        return weights, "content differs from when it was saved"
    if kind == "flipped optimizer":
        flip_bytes(ckpt / optimizer, dcp_files.OPTIMIZER)
        return optimizer, "content differs from when it was saved"
    if kind == "weights as 49152":
        as_49152(ckpt / weights)
        return weights, "content differs from when it was saved"
    if kind == "truncated":
        (ckpt / optimizer).write_bytes((ckpt / optimizer).read_bytes()[:1000])
        return optimizer, "1000 bytes"
    if kind == "symlink outside":
        outside = ckpt.parent.parent / "elsewhere.bin"
        shutil.copy(ckpt / weights, outside)
        (ckpt / weights).unlink()
        (ckpt / weights).symlink_to(outside)
        return weights, "a symbolic link"
    if kind == "manifest names a file outside":
        (ckpt.parent.parent / "outside.bin").write_bytes(b"x" * 10)
        manifest = json.loads((ckpt / integrity.MANIFEST).read_text())
        manifest["files"]["../../outside.bin"] = {"size": 10, integrity.ALGORITHM: integrity.digest(
            ckpt.parent.parent / "outside.bin")}
        (ckpt / integrity.MANIFEST).write_text(json.dumps(manifest))
        return "../../outside.bin", "outside the checkpoint folder"
    if kind == "payload, manifest rewritten":
        (dcp_payload if optimizer.endswith(".distcp") else payload)(ckpt / optimizer, marker)
        rewrite_manifest(ckpt, optimizer)
        return optimizer, "not plain data"
    if kind == "file added":
        name = {"model.safetensors": "pytorch_model.bin", OPTIM: MODEL_STATES.replace("rank_0", "rank_2")}.get(
            weights, dcp_files.shard_file(2))  # FSDP2: a third process's data file
        payload(ckpt / name, marker)
        return name, "not in the manifest"
    if kind == "file and its entry removed":
        (ckpt / other).unlink()
        manifest = json.loads((ckpt / integrity.MANIFEST).read_text())
        del manifest["files"][other]
        (ckpt / integrity.MANIFEST).write_text(json.dumps(manifest))
        return other, "missing (every process writes one)"
    if kind == "no manifest":
        (ckpt / integrity.MANIFEST).unlink()
        return integrity.MANIFEST, "missing or unreadable"
    state_cases = {"step -5": ({"step": -5}, "step: -5 is out of range"),
                   "step 1e9": ({"step": 1e9}, "step: 1000000000.0 is not a whole number"),
                   "step a string": ({"step": "16"}, "step: '16' is not a whole number"),
                   "state a list": (None, "not a JSON object but list"),
                   "unknown key": ({"steps": 3}, "unknown key(s) 'steps'"),
                   "step of another folder": ({"step": 3, "epoch": 0, "step_in_epoch": 3, "skipped_steps": 0,
                                               "eval_losses": []}, "step: 3, but the checkpoint's folder is step")}
    changes, said = state_cases[kind]
    if changes is None:
        (ckpt / "loop_state.json").write_text("[1, 2]")
        rewrite_manifest(ckpt, "loop_state.json")
    else:
        set_state(ckpt, **changes)
    return "loop_state.json", said


KINDS = ["flipped weights", "flipped optimizer", "weights as 49152", "truncated", "symlink outside",
         "manifest names a file outside", "payload, manifest rewritten", "file added", "file and its entry removed",
         "no manifest", "step -5", "step 1e9", "step a string", "state a list", "unknown key", "step of another folder"]


@pytest.fixture
def corrupted(request, tmp_path):
    """corrupted(engine, kind) -> Corrupted: engine "single" (no DeepSpeed), "zero3" or "fsdp2" (2 processes)."""

    def make(engine: str, kind: str) -> Corrupted:
        runs = {"single": "single_process_run", "zero3": "trained_run", "fsdp2": "fsdp2_reference"}
        run = request.getfixturevalue(runs[engine])
        files = FILES[engine]
        root = tmp_path / engine / "checkpoints"
        for name in (files["older"], files["newer"]):
            shutil.copytree(run / "checkpoints" / name, root / name, symlinks=True)
        broken, marker = root / files["newer"], tmp_path / "pwned"
        name, expected = _break(kind, broken, files, marker)
        return Corrupted(root, broken, root / files["older"], expected, name, marker)

    return make
