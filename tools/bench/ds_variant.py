"""An accelerate config that runs like BASE but with some ZeRO settings changed, for gpu_check.sh to
measure one DeepSpeed setting at a time against the loop's own run.

accelerate's YAML reaches only a few DeepSpeed settings; the others (`memory_efficient_linear`,
`reduce_scatter`, `contiguous_gradients`, `overlap_comm`, `sub_group_size`, bucket sizes) need a
DeepSpeed JSON file, which then has to say everything BASE said. This writes both and prints the
YAML's path.

`deepspeed=off` instead writes a YAML for one process with BASE's precision and device and no DeepSpeed
(bf16 autocast over float32 weights and fused AdamW, as the plain-PyTorch ceiling trains): the loop's
own cost against the ceiling, apart from DeepSpeed's.

  python -m tools.bench.ds_variant accelerate_configs/zero3.yaml OUT_DIR memory_efficient_linear=false
  python -m tools.bench.ds_variant accelerate_configs/zero3.yaml OUT_DIR deepspeed=off
  python -m tools.bench.ds_variant --candidates     # the optimizer-step candidates (DS_VARIANTS=optimizer)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from loop.config import did_you_mean

# The YAML keys accelerate refuses beside a DeepSpeed file: said in the file instead (accumulation and
# clipping the loop fills in from the run config).
MOVED = ("zero_stage", "offload_optimizer_device", "offload_param_device", "offload_optimizer_nvme_path",
         "offload_param_nvme_path", "zero3_save_16bit_model", "gradient_accumulation_steps", "gradient_clipping")


def settings(pairs: list[str]) -> dict:
    """KEY=VALUE pairs of `zero_optimization`, values read as JSON (false, 5e8: a whole number is an int)
    or else as text."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    known = {n for name, f in DeepSpeedZeroConfig.model_fields.items() for n in (name, f.alias) if n}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(f"{pair!r}: not KEY=VALUE of a zero_optimization setting DeepSpeed knows"
                             f"{did_you_mean(key, known)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], float) and out[key].is_integer():
            out[key] = int(out[key])
    return out


OFF = "deepspeed=off"

# The settings that may close the gap between DeepSpeed's optimizer step (49 ms on the 1.1B model, run 4) and
# fused AdamW alone (10 ms): gpu_check.sh runs each when DS_VARIANTS names the word `optimizer`. The loop already
# hands DeepSpeed torch's fused AdamW, so the Adam kernel is the same; what differs is stage 3's bookkeeping around
# it: the wait for its reduce stream after backward, a norm per gradient, and a step per sub-group.
OPTIMIZER_CANDIDATES = (
    "overlap_comm=false",  # reduce on the compute stream: nothing to overlap in one process, no stream to wait for
    "sub_group_size=1e12",  # one optimizer sub-group (1e9 makes two for 1.1B): one step, one unscale, one copy back
    "reduce_bucket_size=2e9",  # every gradient in one bucket: one flush into the partition instead of three
    "overlap_comm=false,sub_group_size=1e12,reduce_bucket_size=2e9",  # the three together
)


def without_deepspeed(base: dict) -> dict:
    """BASE's launch (precision, CPU or not) in one process with no distributed wrapper at all."""
    kept = {k: v for k, v in base.items() if k not in ("deepspeed_config", "distributed_type", "num_processes")}
    return {"distributed_type": "NO", "num_processes": 1} | kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("base", type=Path, help="the accelerate config to start from (accelerate_configs/...)")
    p.add_argument("out", type=Path, help="folder for the variant's accelerate YAML and DeepSpeed JSON")
    p.add_argument("set", nargs="+", metavar="KEY=VALUE",
                   help=f"zero_optimization settings to change, or {OFF} alone: the same launch without DeepSpeed")
    if (sys.argv[1:] if argv is None else argv) == ["--candidates"]:
        print(" ".join(OPTIMIZER_CANDIDATES))  # what gpu_check.sh runs for DS_VARIANTS=optimizer
        return 0
    a = p.parse_args(argv)
    base = yaml.safe_load(a.base.read_text())
    if OFF in a.set:
        if len(a.set) > 1:
            print(f"ds_variant: {OFF} takes no other settings (got {' '.join(a.set)})", file=sys.stderr)
            return 2
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "accelerate.yaml").write_text(yaml.safe_dump(without_deepspeed(base), sort_keys=False))
        print(a.out / "accelerate.yaml")
        return 0
    try:
        changed = settings(a.set)
    except ValueError as e:
        print(f"ds_variant: {e}", file=sys.stderr)
        return 2
    ds = base.pop("deepspeed_config")
    offload = {part: {"device": ds.get(f"offload_{part}_device", "none")}
               | ({"nvme_path": ds[f"offload_{part}_nvme_path"]} if ds.get(f"offload_{part}_nvme_path") else {})
               for part in ("optimizer", "param")}
    zero = {"stage": ds.get("zero_stage", 3), "offload_optimizer": offload["optimizer"],
            "offload_param": offload["param"],
            "stage3_gather_16bit_weights_on_model_save": ds.get("zero3_save_16bit_model", False)} | changed
    precision = base.pop("mixed_precision", "no")
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
              "zero_optimization": zero, "steps_per_print": 2**31 - 1}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "deepspeed.json").write_text(json.dumps(config, indent=1))
    kept = {k: v for k, v in ds.items() if k not in MOVED}
    base["deepspeed_config"] = kept | {"deepspeed_config_file": str((a.out / "deepspeed.json").resolve())}
    (a.out / "accelerate.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    print(a.out / "accelerate.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
