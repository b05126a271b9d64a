"""The GPU scripts stay runnable: --tiny runs every step at toy size on CPU, and --dry-run checks every step of the
real path on CPU without its device work."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from tools.bench import ds_variant, scale


def gpu_check(work, code: int = 0, **env) -> list[str]:
    proc = subprocess.run(["bash", "tools/bench/gpu_check.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=os.environ | {"WORK": str(work), "PYTHON": sys.executable} | env)
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("FAIL" in proc.stdout) == (code != 0)
    return proc.stdout.splitlines()


def profiled(lines: list[str], name: str) -> tuple[float, float, str, float]:
    """(step ms, host ms, device busy, operators) of a run in the profile table."""
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("profiled (3 steps)")) + 1:]
    row = next(line for line in table if line.startswith(name)).removeprefix(name).split()
    return float(row[0]), float(row[1]), row[2], float(row[3].replace(",", ""))


def test_gpu_check_runs_at_toy_size(tmp_path):
    lines = gpu_check(tmp_path)
    row = next(line for line in lines if line.startswith("loop/train.py sdpa "))  # one choice at toy size
    tokens_per_s, *_, x_trainer, x_ceiling = row.split()[2:]
    assert float(tokens_per_s.replace(",", "")) > 0  # read back from the run's TensorBoard
    assert float(x_trainer) > 0 and float(x_ceiling) > 0  # both baselines ran and were compared
    for attn in ("sdpa", "sdpa_varlen"):  # the choices run, and the varlen reference
        assert any(line.startswith(f"{attn}: packed vs alone max |logit diff|") for line in lines)
    assert any(line.startswith("HF Trainer + DeepSpeed ZeRO-3") for line in lines)
    fsdp2 = next(line for line in lines if line.startswith("loop/train.py sdpa+fsdp2 "))  # the second engine
    assert float(fsdp2.split()[2].replace(",", "")) > 0
    humaneval = next(line for line in lines if line.startswith("HumanEval answers ("))  # the generation step
    assert float(humaneval.split(" s per problem")[0].split()[-1]) > 0 and "4 problems in" in humaneval
    dpo = next(line for line in lines if line.startswith("loop/train.py DPO sdpa ")).split()
    sft = next(line for line in lines if line.startswith("loop/train.py SFT sdpa ")).split()
    assert float(dpo[3].replace(",", "")) > 0 and float(sft[3].replace(",", "")) > 0  # both read back
    assert float(dpo[5]) > 0 and any(line.startswith("TRL DPOTrainer (") for line in lines)  # against TRL too
    for name in ("loop/train.py sdpa ", "HF Trainer + DeepSpeed ZeRO-3", "ceiling"):  # each profiled after its run
        step_ms, host_ms, busy, operators = profiled(lines, name)
        assert step_ms >= host_ms > 0 and busy == "-" and operators > 100  # on CPU there is no device timeline

    # A second call on the same machine: only the DeepSpeed variants run, beside the first call's results.
    # One of them fails (nvme offload without a path, which DeepSpeed finds in the JSON the variant wrote): it is
    # named at the end, and the rest still runs. (A variant that trains through its JSON is the same launch with
    # other settings: test_a_deepspeed_variant_changes_only_the_settings_it_names checks the JSON.)
    broken = 'offload_param={"device":"nvme"}'
    again = gpu_check(tmp_path, code=1, REUSE="1", DS_VARIANTS=f"{broken} deepspeed=off")
    assert again[-1].endswith(f"FAILED: loop/train.py sdpa+{broken}")
    written = json.loads((tmp_path / f"ds-{broken}" / "deepspeed.json").read_text())
    assert written["zero_optimization"]["offload_param"] == {"device": "nvme"}
    assert [line for line in again if "reusing" in line] and not any("packed vs alone" in line for line in again)
    assert next(line for line in again if line.startswith("loop/train.py sdpa ")).split() == row.split()  # read again
    plain = next(line for line in again if line.startswith("loop/train.py sdpa+deepspeed=off "))
    assert float(plain.split()[2].replace(",", "")) > 0  # the same loop without DeepSpeed trained and was read
    # Without DeepSpeed's hooks and bookkeeping a step runs far fewer operators (about 40% fewer here).
    assert profiled(again, "loop/train.py sdpa+deepspeed=off")[3] < 0.8 * profiled(again, "loop/train.py sdpa ")[3]


def test_a_deepspeed_variant_changes_only_the_settings_it_names(tmp_path):
    """The JSON file a variant needs must say everything the base YAML said, or the comparison would
    measure more than the one setting."""
    from accelerate.utils import DeepSpeedPlugin

    base_path = ROOT / "accelerate_configs" / "zero3.yaml"
    base = yaml.safe_load(base_path.read_text())
    assert ds_variant.main([str(base_path), str(tmp_path), "memory_efficient_linear=false",
                            "stage3_prefetch_bucket_size=5e8"]) == 0
    made = yaml.safe_load((tmp_path / "accelerate.yaml").read_text())
    ds = base.pop("deepspeed_config")
    assert made.pop("deepspeed_config")["zero3_init_flag"] == ds["zero3_init_flag"]
    assert made == {k: v for k, v in base.items() if k != "mixed_precision"}  # accelerate refuses it beside a file
    variant = DeepSpeedPlugin(hf_ds_config=str(tmp_path / "deepspeed.json"), zero3_init_flag=True).deepspeed_config
    plain = DeepSpeedPlugin(zero_stage=ds["zero_stage"], offload_optimizer_device=ds["offload_optimizer_device"],
                            offload_param_device=ds["offload_param_device"],
                            zero3_save_16bit_model=ds["zero3_save_16bit_model"], zero3_init_flag=True).deepspeed_config
    zero = variant["zero_optimization"]
    assert zero.pop("memory_efficient_linear") is False and zero.pop("stage3_prefetch_bucket_size") == 500_000_000
    for k in ("offload_optimizer", "offload_param"):
        plain["zero_optimization"][k].pop("nvme_path")
    assert variant.pop("bf16") == {"enabled": base["mixed_precision"] == "bf16"}
    assert variant.pop("fp16") == {"enabled": False}
    assert variant == plain


def test_the_optimizer_step_candidates_are_ready_to_run(tmp_path, capsys):
    """DS_VARIANTS=optimizer runs these on the GPU; each must make a config DeepSpeed accepts, with its values, or
    the device time would find out."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert ds_variant.main(["--candidates"]) == 0
    assert capsys.readouterr().out.split() == list(ds_variant.OPTIMIZER_CANDIDATES)
    base = str(ROOT / "accelerate_configs" / "zero3.yaml")
    for i, candidate in enumerate(ds_variant.OPTIMIZER_CANDIDATES):
        assert ds_variant.main([base, str(tmp_path / str(i)), *candidate.split(",")]) == 0
        zero = json.loads((tmp_path / str(i) / "deepspeed.json").read_text())["zero_optimization"]
        parsed = DeepSpeedZeroConfig(**zero)
        for key, value in (pair.split("=") for pair in candidate.split(",")):
            assert getattr(parsed, key) == json.loads(value), (candidate, key)


def test_a_deepspeed_setting_it_does_not_know_is_refused(tmp_path, capsys):
    base = str(ROOT / "accelerate_configs" / "zero3.yaml")
    assert ds_variant.main([base, str(tmp_path), "memory_efficient=false"]) == 2
    assert "'memory_efficient=false': not KEY=VALUE of a zero_optimization setting" in capsys.readouterr().err
    assert not (tmp_path / "accelerate.yaml").exists()


def test_the_variant_without_deepspeed_keeps_the_launch_and_drops_only_deepspeed(tmp_path, capsys):
    base = yaml.safe_load((ROOT / "accelerate_configs" / "zero3.yaml").read_text())
    assert ds_variant.main([str(ROOT / "accelerate_configs" / "zero3.yaml"), str(tmp_path), "deepspeed=off"]) == 0
    made = yaml.safe_load((tmp_path / "accelerate.yaml").read_text())
    assert made.pop("distributed_type") == "NO" and made.pop("num_processes") == 1
    assert made == {k: v for k, v in base.items() if k not in ("deepspeed_config", "distributed_type", "num_processes")}
    assert not (tmp_path / "deepspeed.json").exists()
    assert ds_variant.main([str(ROOT / "accelerate_configs" / "zero3.yaml"), str(tmp_path / "x"), "deepspeed=off",
                            "reduce_scatter=false"]) == 2
    assert "deepspeed=off takes no other settings" in capsys.readouterr().err


# lora is qlora's path without --lora.quantize, fsdp2 is full's under another launch config (gpu_check --tiny runs
# the loop under FSDP2): both left to the dry run, which checks their commands.
TINY_PARTS = ("full", "dpo", "qlora", "moe")


def test_gpu_scale_runs_every_part_at_toy_size(tmp_path):
    """gpu_scale.sh --tiny: every path of the GPU run (StarCoder2-3B full and DPO, the 7B QLoRA on bitsandbytes'
    CPU 4-bit path, Qwen3-Coder-30B-A3B LoRA), each against its baseline, in the published architectures at toy
    width. The 7B LoRA and 3B FSDP2 parts are left to the dry run (TINY_PARTS says why).
    About 3-4 minutes on 2 shared cores, the most of this file: 8 launches (accelerate, DeepSpeed's or the
    Trainer's set-up each time) and three models with their tokenizers, which no other test's runs can stand in for
    (other shapes, other baselines); each run is 6 steps, the fewest that leave two logging windows after the
    first."""
    proc = subprocess.run(["bash", "tools/bench/gpu_scale.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env=os.environ | {"WORK": str(tmp_path), "PYTHON": sys.executable,
                                                         "PARTS": " ".join(TINY_PARTS)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    parts = [scale.PARTS[key] for key in TINY_PARTS]
    for part in parts:
        for run in ("loop/train.py", part.baseline):
            row = next(line for line in lines if line.startswith(f"{part.name}: {run} "))
            tokens_per_s, _, _, _, fwd_bwd, _, _, _, _, loss, _ = row.split()[-11:]  # the columns after the batch
            assert float(tokens_per_s.replace(",", "")) > 0, row  # read back from the run
            assert loss == "falls", row  # the first logged window's loss above the last's
            if run == "loop/train.py":
                assert float(fwd_bwd) > 0, row  # the step's time split, from the loop's timers
        memory = next(line for line in lines if line.startswith(f"  {part.title} ") and "estimate" in line)
        assert float(memory.split("estimate")[1].split()[0]) > 0 and "measured" in memory
    assert not any(line.startswith(f"{scale.PARTS['lora'].name}: ") for line in lines)  # only what was asked
    goals = [line for line in lines if line.startswith("  goal: ")]
    assert len(goals) == len(parts) + 1  # each part against its baseline, and DPO against SFT
    assert all(line.endswith(("x PASS", "x FAIL")) for line in goals)
    assert all(float(line.rsplit(": ", 1)[1].split("x")[0]) > 0 for line in goals)  # every ratio measured
    falls = [line for line in lines if line.startswith("  loss falls: ")]
    assert len(falls) == 2 * len(parts) and all(line.endswith("PASS") for line in falls)


def test_gpu_scale_leaves_out_what_its_budget_cannot_hold(tmp_path):
    """On the GPU a call keeps to its device-time budget: a part that would start with too little of it left is
    not started, and the call names it with the command that runs it on the same machine (nothing is launched
    here: no time is left from the start)."""
    proc = subprocess.run(["bash", "tools/bench/gpu_scale.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=os.environ | {"WORK": str(tmp_path), "PYTHON": sys.executable,
                                                         "BUDGET_S": "0", "PARTS": "full lora"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line.split("] ", 1)[1].split(":")[0] for line in proc.stdout.splitlines() if "] skipped " in line] == \
        ["skipped full", "skipped lora"]
    assert proc.stdout.splitlines()[-2].endswith('REUSE=1 PARTS="full lora" bash tools/bench/gpu_scale.sh')
    assert not (tmp_path / "run-full.log").exists() and not (tmp_path / "sc2-3b").exists()


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
