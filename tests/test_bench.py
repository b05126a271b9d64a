"""gpu_check.sh stays runnable: --tiny runs every step at toy size on CPU, a second call only its DeepSpeed
variants. (gpu_scale.sh's --tiny is tests/test_bench_scale.py, both scripts' --dry-run tests/test_bench_dry_run.py:
three files, so that the three longest tests of the suite can run beside each other.)"""

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import ROOT
from tools.bench import ds_variant


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
