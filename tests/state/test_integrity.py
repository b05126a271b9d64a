"""Nothing in a checkpoint folder runs code, and a broken checkpoint is named and passed over."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loop.state import checkpoints, consolidate, export, integrity
from tests.conftest import ROOT, launch, write_config


class Payload:
    """Unpickling this runs a shell command: what a tampered checkpoint file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tampered_copy(ckpt: Path, dest: Path, name: str, marker: Path, keep_manifest: bool) -> Path:
    """A copy of `ckpt` whose file `name` carries a payload; its manifest updated to the new size (as a
    careful attacker would) or left as saved."""
    copy = dest / ckpt.name
    shutil.copytree(ckpt, copy)
    target = copy / name
    if target.suffix == ".pt":
        torch.save({"optimizer_state_dict": Payload(marker), "module": Payload(marker)}, target)
    else:
        target.write_bytes(b"\x80\x04not safetensors at all" + marker.as_posix().encode())
    if keep_manifest:
        sizes = json.loads((copy / integrity.MANIFEST).read_text())
        sizes[name] = target.stat().st_size
        (copy / integrity.MANIFEST).write_text(json.dumps(sizes))
    return copy


FILES = ["pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt",
         "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_0.safetensors"]


@pytest.mark.parametrize("name", FILES)
def test_a_payload_in_any_checkpoint_file_is_refused_by_every_reader(trained_run, tmp_path, name):
    marker = tmp_path / "pwned"
    ckpt = tampered_copy(trained_run / "checkpoints" / "step_00000016", tmp_path, name, marker, keep_manifest=True)
    assert any(name in p and "not plain data" in p or "unreadable" in p for p in integrity.problems(ckpt))
    if name.endswith(".pt"):  # the readers of weights: consolidation, export, generation
        with pytest.raises(consolidate.ConsolidationError, match=Path(name).name):
            export.from_checkpoint(ckpt, tmp_path / "exported")
        for tool in (["tools/generate.py", str(ckpt), "--max-new-tokens", "2"],
                     ["tools/consolidate_checkpoint.py", str(ckpt), str(tmp_path / "m")]):
            proc = subprocess.run([sys.executable, *tool], cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 2 and Path(name).name in proc.stderr and "Traceback" not in proc.stderr, tool
        with pytest.raises(integrity.UntrustedCheckpoint, match="not plain data"):
            integrity.torch_load(ckpt / name)  # what DeepSpeed's engine is given on resume
    else:
        with pytest.raises(integrity.UntrustedCheckpoint, match="cannot be restored"):
            integrity.load_rng(ckpt, 0)  # an error, not accelerate's INFO line
    assert not marker.exists()


def test_resume_passes_over_a_broken_checkpoint_and_names_it(trained_run, tiny_dir, tmp_path):
    """step 16 holds a payload (manifest rewritten to match) and step 8 a truncated shard (manifest kept):
    an explicit path to either is refused; `latest` falls back to step 8... which is broken too, and then
    to nothing, naming both files."""
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    good = trained_run / "checkpoints" / "step_00000008"
    shutil.copytree(good, out / "checkpoints" / good.name)
    bad = tampered_copy(trained_run / "checkpoints" / "step_00000016", out / "checkpoints", FILES[0], marker, True)
    path, notes = checkpoints.choose_intact("latest", out / "checkpoints")
    assert path.name == "step_00000008" and FILES[0] in notes[0] and str(bad) in notes[0]
    with pytest.raises(checkpoints.CheckpointError, match="no intact checkpoint"):
        checkpoints.choose_intact(str(bad), out / "checkpoints")
    shard = out / "checkpoints" / good.name / FILES[1]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated inside a COMPLETE checkpoint
    with pytest.raises(checkpoints.CheckpointError, match=r"rank_1_mp_rank_00_optim_states.pt: 1000 bytes"):
        checkpoints.choose_intact("latest", out / "checkpoints")

    # The whole run, launched: it resumes from the intact step 8 with a warning naming the broken step 16.
    shutil.rmtree(out / "checkpoints" / good.name)
    shutil.copytree(good, out / "checkpoints" / good.name)
    cfg = yaml_config(trained_run, tiny_dir, out)
    launch(cfg, "--resume_from_checkpoint", "latest", "--seed", "7")
    log = (out / "train.log").read_text()
    assert "step_00000016 is broken, not used" in log and "resumed from" in log and "at step 8" in log
    assert not marker.exists()
    assert load_file(out / "final" / "model.safetensors")  # it went on to the end


def yaml_config(trained_run: Path, tiny_dir: Path, out: Path) -> Path:
    """The config `trained_run` was made with (conftest), now pointing at `out`."""
    import yaml

    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    return write_config(out.parent / "resume.yaml", tiny_dir, out, model=saved["model"], data=saved["data"],
                        training=saved["training"])


def test_a_manifest_records_every_file_and_sizes_are_checked(trained_run):
    ckpt = trained_run / "checkpoints" / "step_00000016"
    sizes = json.loads((ckpt / integrity.MANIFEST).read_text())
    assert {*FILES, "loop_state.json", "run_config.yaml", "config.json", "tokenizer.json"} <= set(sizes)
    assert not [p for p in ckpt.rglob("*.pkl")]  # no pickle is written at all
    assert integrity.problems(ckpt) == [] and integrity.size(ckpt) == sum(sizes.values())
