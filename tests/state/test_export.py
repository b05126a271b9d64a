"""Exported model folders appear whole or not at all, and are checked against the full shapes."""

import os

import pytest
import torch
from safetensors.torch import save_file

from loop.state import export


def test_a_failed_export_leaves_neither_a_folder_nor_its_temporary(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("the previous export")
    with pytest.raises(RuntimeError, match="disk full"), export.staged(out) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert (out / "old.txt").read_text() == "the previous export"  # untouched
    assert not list(tmp_path.glob(".tmp-*"))
    with export.staged(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_zero3_placeholders_and_missing_weights_are_caught(tmp_path):
    save_file({"a": torch.zeros(0), "b": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    expected = {"a": (4, 4), "b": (2, 2), "lm_head.weight": (2, 2), "c": (3,)}
    with pytest.raises(export.ExportError, match=r"c: missing; a: shape \(0,\) != \(4, 4\)"):
        export.check_saved_model(tmp_path, expected, tied={"lm_head.weight"})


def test_exported_files_are_readable_by_group_and_others(tmp_path):
    os.umask(0o022)
    with export.staged(tmp_path / "model") as tmp:
        fd = os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)  # as a private writer makes it
        os.close(fd)
        (tmp / "sub").mkdir(mode=0o700)
    assert oct((tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "model" / "sub").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "model").stat().st_mode & 0o777) == "0o755"
