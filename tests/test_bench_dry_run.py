"""--dry-run checks every step of the GPU scripts' real path on CPU without its device work, and names a command
that would fail."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def dry_run(script: str, work) -> list[str]:
    proc = subprocess.run(["bash", f"tools/bench/{script}", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=os.environ | {"WORK": str(work), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    commands = [line for line in lines if line.startswith("dry run: ") and "checking the" not in line]
    checked = [line for line in lines if line.startswith("ok: ")]
    assert commands and len(checked) == len(commands) and not any("FAIL" in line for line in lines), lines
    return lines


@pytest.mark.slow
def test_the_gpu_scripts_dry_runs_check_the_real_path_on_cpu(tmp_path):
    """--dry-run takes the GPU path (not --tiny's) on CPU with no device work: the real model shapes built on the
    meta device, the real configs read back, every device command assembled, printed and checked without being
    run. It catches what --tiny cannot: gpu_check.sh's real path imported `loop.attention` for months after the
    layout moved it, and nothing ran that line. Three tokenizers trained and the stack imported a dozen times
    (about a minute on 2 shared cores): in the slow tier, which CI runs."""
    check = dry_run("gpu_check.sh", tmp_path / "check")
    trains = [line for line in check if line.startswith("ok: accelerate launch (zero3.yaml") and "train.py" in line]
    assert len(trains) >= 2 and all("gpt_bigcode (1,1" in line for line in trains)  # the 1.1B model, on meta
    assert all("micro-batch 8 x 2048 tokens" in line for line in trains)
    assert any(", dpo, " in line for line in trains)  # the DPO run's overrides read back too
    fsdp2 = [line for line in check if line.startswith("ok: accelerate launch (fsdp2.yaml") and "train.py" in line]
    assert len(fsdp2) == 1 and "gpt_bigcode (1,1" in fsdp2[0]  # the second engine's launch, its config read back
    assert any("tools.bench.trainer_baseline: arguments accepted" in line for line in check)  # through accelerate
    for module in ("ceiling", "dpo_baseline", "gpu_report", "packed_logits", "code_eval"):
        assert any(line.startswith(f"ok: tools.bench.{module}: arguments accepted") for line in check), module
    assert not (tmp_path / "check" / "model" / "model.safetensors").exists()  # no weights: the shape only

    scale_lines = dry_run("gpu_scale.sh", tmp_path / "scale")
    trains = [line for line in scale_lines if "loop/train.py: config read back" in line]
    assert len(trains) == 6 and all("x 4096 tokens" in line for line in trains)  # every part of scale.PARTS
    dense = [line for line in trains if "starcoder2 (" in line]
    params = sorted({int(line.split("starcoder2 (")[1].split()[0].replace(",", "")) for line in dense})
    assert len(dense) == 5 and len(params) == 2 and 2.9e9 < params[0] < 3.3e9 and 7e9 < params[1] < 7.6e9  # 3B, 7B
    assert sum(line.startswith("ok: accelerate launch (fsdp2.yaml") for line in trains) == 1  # the 3B under FSDP2
    moe = [line for line in trains if "qwen3_moe (" in line]
    assert len(moe) == 1 and 30e9 < int(moe[0].split("qwen3_moe (")[1].split()[0].replace(",", "")) < 31e9
    assert sum("tools.bench.trainer_baseline: arguments accepted" in line for line in scale_lines) == 4


@pytest.mark.slow
def test_the_long_context_gpu_script_s_dry_run_checks_its_real_path(tmp_path):
    """gpu_long.sh --dry-run (issue 38.6): the 7B shape built on the meta device with its context raised, a loop run
    per row length with LoRA, offloaded checkpoints and a tiled MLP read back, the Trainer at the longest length
    and the report, each checked without being run (about 30 s: in the slow tier with the others)."""
    lines = dry_run("gpu_long.sh", tmp_path / "long")
    trains = [line for line in lines if line.startswith("ok: accelerate launch (zero3.yaml") and "train.py" in line]
    lengths = [int(line.split("micro-batch 1 x ")[1].split()[0]) for line in trains]
    assert lengths == [32768, 65536, 131072, 262144] and all("qwen2 (7,6" in line for line in trains)
    assert sum("tools.bench.trainer_baseline: arguments accepted" in line for line in lines) == 1
    assert any(line.startswith("ok: tools.bench.gpu_long_report: arguments accepted") for line in lines)
    assert not (tmp_path / "long" / "model" / "model.safetensors").exists()


def test_the_dry_run_names_a_command_that_would_fail(tmp_path, capsys):
    """A dry run passes only when every command would start: a setting loop/train.py does not know, an argument a
    module refuses and a missing launcher config are each named, and the others still checked."""
    from tools.bench import dry_run as checker

    py = sys.executable
    launcher = f"{py} -m accelerate.commands.launch --num_processes 1 --config_file"
    good = f"{py} -m tools.bench.ceiling model data.jsonl --seq-len 2048"
    (tmp_path / "commands").write_text("\n".join([
        f"{launcher} accelerate_configs/zero3.yaml loop/train.py configs/quickstart.yaml --no_such_setting 1",
        f"{py} -m tools.bench.ceiling model data.jsonl --no-such-flag",
        f"{launcher} accelerate_configs/missing.yaml loop/train.py configs/quickstart.yaml",
        good]) + "\n")
    assert checker.main([str(tmp_path / "commands")]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED: ") == 3 and "no_such_setting" in out and "ok: tools.bench.ceiling" in out
