"""Exported model folders appear whole or not at all, and are checked against the full shapes."""

import pytest
import torch
from safetensors.torch import save_file

from loop import export


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
