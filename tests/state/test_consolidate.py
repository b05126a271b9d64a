import json
import shutil
import subprocess
import sys

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loop.state import consolidate, export
from loop.state.checkpoints import CheckpointError
from loop.state.consolidate import ConsolidationError
from tests.conftest import ROOT
from tests.state.conftest import rewrite_manifest


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return trained_run / "checkpoints" / "step_00000016"


def read_all(model_dir):
    out = {}
    for f in model_dir.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_output_equals_deepspeeds_zero_to_fp32(ckpt, tmp_path, dtype):
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    aliases = export.from_checkpoint(ckpt, tmp_path / "m", dtype=dtype).aliases
    written = read_all(tmp_path / "m")
    assert aliases == {"lm_head.weight": "transformer.wte.weight"} and "lm_head.weight" not in written
    assert set(written) == set(reference) - {"lm_head.weight"}
    for k, v in written.items():
        assert torch.equal(v, reference[k].to(export.DTYPES[dtype])), k
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied again
    assert torch.equal(model.lm_head.weight, reference["lm_head.weight"].to(export.DTYPES[dtype]))
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert "<|assistant|>" in tok.chat_template["default"] and model.generation_config.eos_token_id == \
        tok.convert_tokens_to_ids("<|end|>")


def test_shards_and_index_reload(ckpt, tmp_path):
    export.from_checkpoint(ckpt, tmp_path / "m", dtype="bf16", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "m" / f).is_file() for f in files)
    assert all(f.stat().st_size < 200_000 + 600_000 for f in (tmp_path / "m").glob("*.safetensors"))
    report = consolidate.verify(ckpt, tmp_path / "m", torch.bfloat16, ["Hello"])
    assert report["max_diff_vs_cast_master"] == 0
    assert 0 < report["max_diff_vs_fp32_master"] < 1e-2 and report["max_logit_diff"] < 1.0


def broken_copy(ckpt, tmp_path, damage):
    copy = tmp_path / "ck"
    shutil.copytree(ckpt, copy)
    damage(copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "pytorch_model" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
     "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: missing optimizer state file of rank 1"),
    (lambda c: (c / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink(),
     "zero_pp_rank_0_mp_rank_00_model_states.pt: missing model state file of rank 0"),
    (lambda c: (c / "pytorch_model" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(
        (c / "pytorch_model" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes()[:5000]),
     "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt: unreadable, truncated"),
    (lambda c: shutil.rmtree(c / "pytorch_model"), "not a ZeRO checkpoint"),
])
def test_bad_input_names_the_file_and_leaves_no_model(ckpt, tmp_path, damage, message):
    """What the consolidation's own reader finds, and, first, the checkpoint's verification (every tool's)."""
    broken = broken_copy(ckpt, tmp_path, damage)
    with pytest.raises(ConsolidationError, match=message.replace(".", r"\.")):
        consolidate.write(broken, tmp_path, torch.float32)
    with pytest.raises(CheckpointError, match=r"is broken|missing|bytes, \d+ when it was saved"):
        export.from_checkpoint(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_the_shards_are_the_checkpoints_own_wherever_deepspeeds_latest_points(trained_run, tmp_path, capsys):
    """Step 8's `latest` made to name step 16's shards (its manifest rewritten to match): consolidation still
    reads step 8's own, and says the step its loop state records."""
    from tools import consolidate_checkpoint

    root = tmp_path / "checkpoints"
    for step in ("step_00000008", "step_00000016"):
        shutil.copytree(trained_run / "checkpoints" / step, root / step)
    (root / "step_00000008" / "latest").write_text("../step_00000016/pytorch_model")
    rewrite_manifest(root / "step_00000008", "latest")
    assert consolidate_checkpoint.main([str(root / "step_00000008"), str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    assert f"from {root / 'step_00000008'} (step 8, fp32)" in capsys.readouterr().out
    reference = get_fp32_state_dict_from_zero_checkpoint(str(trained_run / "checkpoints" / "step_00000008"),
                                                         tag="pytorch_model")
    written = read_all(tmp_path / "m")
    assert written and all(torch.equal(v, reference[k]) for k, v in written.items())


@pytest.mark.parametrize("read_only", [False, True])
def test_consolidating_onto_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(ckpt, small_disk, capsys,
                                                                                    read_only):
    """A real file system of its own, 64 KiB (the model is 1.7 MB) or read-only: exit 1 (the disk filled) or
    2 (OUTPUT_DIR cannot be written), one line, and nothing left on it."""
    from tools import consolidate_checkpoint

    disk = small_disk(kib=64, read_only=read_only)
    assert consolidate_checkpoint.main([str(ckpt), str(disk / "model"), "--dtype", "fp32"]) == (2 if read_only else 1)
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1].startswith("error: ") and "Traceback" not in "".join(said)
    assert ("is not writable (a read-only file system" if read_only else "no space left on device") in said[-1]
    assert list(disk.iterdir()) == []


def test_command_line_picks_the_newest_checkpoint_and_verifies(trained_run, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "consolidate_checkpoint.py"),
                           str(trained_run / "checkpoints"), str(tmp_path / "m"), "--verify"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step_00000016 (step 16, bf16)" in proc.stdout and "max_diff_vs_cast_master=0" in proc.stdout
    assert "consolidate:" not in proc.stderr  # no progress bar into a log (each refresh a line of its own)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "consolidate_checkpoint.py"),
                           str(tmp_path / "nothing"), str(tmp_path / "m2")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a directory" in proc.stderr


def test_a_checkpoint_without_deepspeed_is_written_and_verified_like_a_zero3_one(single_process_run, tmp_path, capsys):
    """A one-process run's checkpoint holds whole weights (model.safetensors, the tied output projection once):
    the tool writes them cast, and --verify compares them (before, it wrote the model, then raised a
    ConsolidationError traceback). Generation reads the same checkpoint through the same reader."""
    from loop.inference.load import load_for_generation
    from tools import consolidate_checkpoint

    ckpt = single_process_run / "checkpoints" / "step_00000004"
    code = consolidate_checkpoint.main([str(single_process_run / "checkpoints"), str(tmp_path / "m"), "--verify"])
    said = capsys.readouterr()
    assert code == 0, said.err
    assert f"from {ckpt} (step 4, bf16)" in said.out and "max_diff_vs_cast_master=0" in said.out
    assert "Traceback" not in said.err
    saved, written = load_file(ckpt / "model.safetensors"), read_all(tmp_path / "m")
    assert set(written) == set(saved) and all(torch.equal(v, saved[k].to(torch.bfloat16)) for k, v in written.items())
    model, _ = load_for_generation(single_process_run / "checkpoints")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied again
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
