"""Nothing in a checkpoint folder runs code, every file is what was saved (size and content digest), and a
broken checkpoint is named and passed over, by resume and by every tool."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loop.state import checkpoints, export, integrity
from tests.conftest import ROOT, launch, run_in_process, write_config
from tests.state.conftest import FILES as ENGINE_FILES
from tests.state.conftest import KINDS, payload, rewrite_manifest


def tampered_copy(ckpt: Path, dest: Path, name: str, marker: Path, keep_manifest: bool) -> Path:
    """A copy of `ckpt` whose file `name` carries a payload; its manifest rewritten to the new size and digest
    (as a careful attacker would, so that only the safe reader stands in the way) or left as saved."""
    copy = dest / ckpt.name
    shutil.copytree(ckpt, copy)
    target = copy / name
    if target.suffix == ".pt":
        payload(target, marker)
    else:
        target.write_bytes(b"\x80\x04not safetensors at all" + marker.as_posix().encode())
    if keep_manifest:
        rewrite_manifest(copy, name)
    return copy


FILES = ["pytorch_model/zero_pp_rank_0_mp_rank_00_model_states.pt",
         "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_0.safetensors"]


@pytest.mark.parametrize("name", FILES)
def test_a_payload_in_any_checkpoint_file_is_refused_by_every_reader(trained_run, tmp_path, name):
    marker = tmp_path / "pwned"
    ckpt = tampered_copy(trained_run / "checkpoints" / "step_00000016", tmp_path, name, marker, keep_manifest=True)
    assert any(name in p and "not plain data" in p or "unreadable" in p for p in integrity.problems(ckpt))
    if name.endswith(".pt"):  # the readers of weights: consolidation, export, generation
        with pytest.raises(checkpoints.CheckpointError, match=Path(name).name):
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
    path, state, notes = checkpoints.choose_intact("latest", out / "checkpoints")
    assert path.name == "step_00000008" and state.step == 8 and FILES[0] in notes[0] and str(bad) in notes[0]
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
    proc = launch(cfg, "--resume_from_checkpoint", "latest", "--seed", "7")
    log = (out / "train.log").read_text()
    assert "step_00000016 is broken, not used" in log and "resumed from" in log and "at step 8" in log
    console = proc.stdout + proc.stderr
    assert console.count("step_00000016 is broken, not used") == 1  # said once, not by every process
    assert not marker.exists()
    assert load_file(out / "final" / "model.safetensors")  # it went on to the end


def yaml_config(trained_run: Path, tiny_dir: Path, out: Path) -> Path:
    """The config `trained_run` was made with (conftest), now pointing at `out`."""
    import yaml

    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    return write_config(out.parent / "resume.yaml", tiny_dir, out, model=saved["model"], data=saved["data"],
                        training=saved["training"])


@pytest.mark.parametrize("engine", ["single", "zero3", "fsdp2"])
def test_a_manifest_records_every_file_with_its_size_and_digest(request, engine):
    runs = {"single": "single_process_run", "zero3": "trained_run", "fsdp2": "fsdp2_reference"}
    ckpt = request.getfixturevalue(runs[engine]) / "checkpoints" / ENGINE_FILES[engine]["newer"]
    entries = integrity.read_manifest(ckpt)
    written = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    evaluated = {name for name in written if name.startswith(integrity.EVALUATED)}  # the code evaluation's, after
    assert set(entries) == written - {integrity.MANIFEST, checkpoints.MARKER} - evaluated
    assert evaluated if engine == "zero3" else not evaluated  # the shared ZeRO-3 run scores code at step 16
    assert {"loop_state.json", "run_config.yaml", "config.json", "tokenizer.json"} <= set(entries)
    assert {"single": {"model.safetensors", "optimizer.bin"}, "zero3": set(FILES),
            "fsdp2": {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng_state_1.safetensors"}}[engine] \
        <= set(entries)
    for name, entry in entries.items():
        assert entry == {"size": (ckpt / name).stat().st_size, integrity.ALGORITHM: integrity.digest(ckpt / name)}
    assert not [p for p in ckpt.rglob("*.pkl")]  # no pickle is written at all
    assert integrity.problems(ckpt) == [] and integrity.size(ckpt) == sum(e["size"] for e in entries.values())


@pytest.mark.parametrize("engine", ["single", "zero3", "fsdp2"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_corruption_is_named_and_latest_falls_back_to_the_intact_checkpoint(corrupted, tmp_path, engine, kind):
    """Issue 25's cases, on real checkpoints of every engine (FSDP2's in DCP format: its data files hold the
    weights and the optimizer's state together): resume's choice, and every tool's (export and consolidation,
    generation), passes over the broken checkpoint naming the file and why; given the broken one itself, they
    refuse it. Nothing is unpickled on the way."""
    c = corrupted(engine, kind)
    found = integrity.problems(c.broken)
    assert any(c.file in line and c.expected in line for line in found), found
    path, state, notes = checkpoints.choose_intact("latest", c.root)
    assert path == c.intact and state.step == integrity.folder_step(c.intact)
    assert len(notes) == 1 and str(c.broken) in notes[0] and c.expected in notes[0]
    with pytest.raises(checkpoints.CheckpointError, match=re.escape(c.expected)):
        checkpoints.usable(c.broken)
    done = export.from_checkpoint(c.root, tmp_path / "model")
    assert done.checkpoint == c.intact and done.step == state.step and c.expected in done.passed_over[0]
    assert not c.marker.exists()


@pytest.mark.parametrize("kind", ["flipped optimizer", "payload, manifest rewritten", "step -5"])
def test_resume_without_deepspeed_passes_over_a_broken_checkpoint(corrupted, tiny_dir, tmp_path, kind):
    """The whole run, in this process: optimizer.bin changed in place (same size) or poisoned, or a loop state
    of step -5, in the newest checkpoint; the run resumes from the older one, says why, and goes on to the end
    without ever writing a step folder the state made up."""
    c = corrupted("single", kind)
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, c.root.parent,
                       training={"max_steps": 4, "save_every": 2, "keep_last": 5, "eval_every": 0})
    assert run_in_process(cfg, "--resume_from_checkpoint", "latest") == 0
    log = (c.root.parent / "train.log").read_text()
    assert f"checkpoint {c.broken} is broken, not used: " in log and c.expected in log
    assert f"resumed from {c.intact} at step 2" in log
    assert sorted(p.name for p in c.root.iterdir()) == ["step_00000002", "step_00000004"]
    assert integrity.problems(c.root / "step_00000004") == []  # written again, whole
    assert not c.marker.exists()


def test_accelerates_loader_reads_through_the_safe_reader(tmp_path):
    """What resume without DeepSpeed reads with accelerate (optimizer.bin, pytorch_model.bin) goes through the
    reader the ZeRO-3 shards go through."""
    from accelerate import checkpointing

    from loop.engine.accelerator import safe_state_loading
    from loop.engine.zero3_files import UntrustedCheckpoint

    marker = tmp_path / "pwned"
    payload(tmp_path / "optimizer.bin", marker)
    with safe_state_loading(), pytest.raises(UntrustedCheckpoint, match="optimizer.bin: unreadable, truncated or "
                                                                         "not plain data"):
        checkpointing.load(tmp_path / "optimizer.bin", map_location="cpu")
    assert not marker.exists() and checkpointing.load.__module__ == "accelerate.utils.other"  # put back


def test_a_checkpoint_given_to_a_tool_must_be_complete(trained_run, tmp_path):
    """A save that never finished (no COMPLETE, no manifest), given to consolidation: refused, exit 2, one line."""
    from tools import consolidate_checkpoint

    partial = tmp_path / ".tmp-step_00000016"
    shutil.copytree(trained_run / "checkpoints" / "step_00000016", partial)
    (partial / checkpoints.MARKER).unlink()
    (partial / integrity.MANIFEST).unlink()
    assert consolidate_checkpoint.main([str(partial), str(tmp_path / "model")]) == 2
    assert not (tmp_path / "model").exists()



def test_a_checkpoint_saved_before_digests_is_checked_by_size(single_process_run, tmp_path):
    """A manifest of sizes only (written before 2026-12) still resumes; its sizes are still checked."""
    ckpt = tmp_path / "step_00000004"
    shutil.copytree(single_process_run / "checkpoints" / ckpt.name, ckpt)
    sizes = {name: e["size"] for name, e in integrity.read_manifest(ckpt).items()}
    (ckpt / integrity.MANIFEST).write_text(json.dumps(sizes))
    assert integrity.problems(ckpt) == [] and integrity.size(ckpt) == sum(sizes.values())
    (ckpt / "optimizer.bin").write_bytes(b"short")
    assert integrity.problems(ckpt) == [f"{ckpt / 'optimizer.bin'}: 5 bytes, {sizes['optimizer.bin']} when it was "
                                        "saved"]
