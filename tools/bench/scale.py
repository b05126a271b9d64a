"""What gpu_scale.sh picks and prints: the micro-batch of each part, the TRL batch of the same pairs, and the
table it ends with (each loop run beside its baseline, the memory estimate against the measured peak, and the
goals with PASS or FAIL).

  python -m tools.bench.scale batch MODEL --seq-len 4096 [--lora-rank 16 [--qlora]]  # the largest that fits
  python -m tools.bench.scale pairs MODEL PAIRS.jsonl --seq-len 4096 --micro-batch 8 --accumulation 2
  python -m tools.bench.scale report WORK --seq-len 4096 --batch full=8 lora=8 qlora=8 dpo=8

A part's loop run is WORK/run-PART (read from its TensorBoard, the first logging window left out, as
gpu_report.py reads gpu_check.sh's); its baseline is the JSON line in WORK/PART-baseline.json. The SFT that
DPO is compared with is the full fine-tune's run: the same model, rows, micro-batch and checkpointing.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from loop.model import estimate
from tools.bench import gpu_report

LORA_RANK = 16  # the issue's adapter: rank 16 on every projection (loop/model/lora.py's TARGETS)
MEMORY_TOLERANCE = 0.15  # an estimate further than this from the measured peak is to be corrected


@dataclass(frozen=True)
class Part:
    name: str  # a table row's prefix
    title: str
    model: str  # the folder under WORK gpu_scale.sh builds
    baseline: str
    goal: float  # the loop's tokens/s over the baseline's, at least
    lora_rank: int = 0
    qlora: bool = False
    engine: str = "deepspeed"  # as loop/engine/registry.py names it: for the memory estimate
    baseline_of: str = ""  # the part whose baseline run this one is measured against (default: its own)


PARTS = {
    "full": Part("3B full", "StarCoder2-3B full fine-tune, ZeRO-3", "sc2-3b", "HF Trainer + DeepSpeed ZeRO-3", 1.3),
    "lora": Part("7B LoRA", "StarCoder2-7B LoRA r16", "sc2-7b", "HF Trainer + peft", 1.3, LORA_RANK),
    "qlora": Part("7B QLoRA", "StarCoder2-7B QLoRA r16, NF4 base", "sc2-7b", "HF Trainer + peft + bitsandbytes", 1.3,
                  LORA_RANK, True),
    "fsdp2": Part("3B FSDP2", "StarCoder2-3B full fine-tune, FSDP2", "sc2-3b", "HF Trainer + DeepSpeed ZeRO-3", 1.3,
                  engine="fsdp2", baseline_of="full"),
    "dpo": Part("3B DPO", "StarCoder2-3B DPO, ZeRO-3", "sc2-3b", "TRL DPOTrainer, precomputed reference", 1.5),
    "moe": Part("30B-A3B LoRA", "Qwen3-Coder-30B-A3B LoRA r16 (attention; experts frozen)", "q3c-30b",
                "HF Trainer + peft", 1.3, LORA_RANK),
}
DPO_OVER_SFT = 0.9  # the DPO step's tokens/s over the loop's own SFT step on the same rows, at least


def estimated_gb(model: str, part: Part, micro_batch: int, seq_len: int) -> float:
    """tools/estimate_memory.py's figure for one GPU, with gradient checkpointing: ZeRO-3 without offload, or the
    LoRA / QLoRA row."""
    rows = estimate.estimate(model, 1, 1, micro_batch, seq_len, True, lora_rank=part.lora_rank, qlora=part.qlora,
                             engine=part.engine)
    return rows[1]["gpu_gb"]


def baseline_logits_gb(model: str, micro_batch: int, seq_len: int) -> float:
    """What a Trainer holds beyond the loop: the whole batch's logits at once (bf16, their float32 copy for the
    loss, its log-softmax, and the gradient in both precisions: about 16 bytes a logit), where the loop's
    chunked head holds one chunk (which the estimate counts)."""
    vocab = estimate.read_config(model).vocab_size
    return micro_batch * seq_len * vocab * 16 / estimate.GB


def largest_batch(model: str, part: Part, seq_len: int, memory_gb: float, share: float, cap: int) -> int:
    """The largest power of two up to `cap` whose estimated peak, the loop's and its baseline's, stays within
    `share` of the device's memory (the estimate is a lower bound; the rest is margin)."""
    mb = cap
    while mb > 1 and (estimated_gb(model, part, mb, seq_len) + baseline_logits_gb(model, mb, seq_len)
                      > share * memory_gb):
        mb //= 2
    return max(1, mb)


def loop_run(run: Path) -> dict | None:
    """A loop run's means (first window left out), its peak memory and its first and last window's loss."""
    if not (run / "tensorboard").is_dir():
        return None
    logged = gpu_report.scalars(run)
    out = gpu_report.windows(run)
    out["peak_bytes"] = max((v for _, v in logged.get("memory/peak_bytes", [])), default=0)
    out["losses"] = [v for _, v in logged.get("train/loss", [])]
    return out


def falls(losses: list[float]) -> bool:
    return len(losses) >= 2 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def fmt(value: float, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None and math.isfinite(value) else f"{'-':>{width}s}"


def report(work: Path, seq_len: int, batches: dict[str, int]) -> int:
    on_gpu = torch.cuda.is_available()
    print(f"StarCoder2 at scale: random weights in the published shapes, rows of {seq_len} tokens, gradient "
          f"checkpointing, one {'GPU: ' + torch.cuda.get_device_name() if on_gpu else 'CPU process (--tiny)'}")
    w = max(len(f"{p.name}: {p.baseline}") for p in PARTS.values())
    print(f"{'run':{w}s} {'batch':>13s} {'tokens/s':>10s} {'MFU':>6s} {'peak GB':>8s} {'data ms':>8s} "
          f"{'fwd+bwd ms':>11s} {'optim ms':>9s} {'loss first -> last':>24s} {'x base':>7s}")
    rates, lines, goals, memory = {}, [], [], []

    def row(name: str, batch: str, tps: float, mfu: float, peak: float, ms: dict, losses: list[float], ratio: float):
        loss = (f"{losses[0]:.3f} -> {losses[-1]:.3f} " + ("falls" if falls(losses) else "FAIL")) if losses \
            else "no loss logged FAIL"
        print(f"{name:{w}s} {batch:>13s} {fmt(tps, ',.0f', 10)} {fmt(mfu, '.1%', 6)} {fmt(peak / 2**30, '.1f', 8)} "
              f"{fmt(ms.get('data'), '.1f', 8)} {fmt(ms.get('forward_backward'), '.1f', 11)} "
              f"{fmt(ms.get('optimizer'), '.1f', 9)} {loss:>24s} {fmt(ratio, '.2f', 7)}")
        lines.append((name, falls(losses)))

    for key, part in PARTS.items():
        if key not in batches:
            continue
        mb, model = batches[key], str(work / part.model)
        ours = loop_run(work / f"run-{key}")
        base = gpu_report.result(work / f"{part.baseline_of or key}-baseline.json")
        base_tps = base.get("tokens_per_s") or float("nan")
        tps = ours.get("throughput/tokens_per_s", float("nan")) if ours else float("nan")
        rates[key] = tps
        if ours:
            mfu = ours.get("throughput/mfu", float("nan"))
            ms = {k: 1000 * ours[f"time/{k}"] for k in ("data", "forward_backward", "optimizer") if f"time/{k}" in ours}
            row(f"{part.name}: loop/train.py", f"{mb} rows", tps, mfu, ours["peak_bytes"], ms, ours["losses"],
                tps / base_tps)
            est = estimated_gb(model, part, mb, seq_len)
            memory.append((part.title, est, ours["peak_bytes"] / 2**30))
        else:
            mfu = float("nan")
            print(f"{part.name + ': loop/train.py':{w}s} failed before its first logged step: see run-{key}.log")
        if base:  # the same model and rows, so the same FLOPs a token: MFU in proportion to tokens/s
            row(f"{part.name}: {part.baseline}", base.get("batch", "?"), base_tps, mfu * base_tps / tps,
                base.get("peak_bytes", 0), {}, base.get("losses", []), 1.0)
        else:
            print(f"{part.name + ': ' + part.baseline:{w}s} failed: see {key}-baseline.log")
        goals.append((f"{part.title} >= {part.goal:.1f}x {part.baseline}", tps / base_tps, part.goal))
    if "fsdp2" in rates and "full" in rates:  # which engine to choose: the same model, rows and batch
        ratio = fmt(rates["fsdp2"] / rates["full"], ".2f", 0)
        print(f"engines: FSDP2 / ZeRO-3 tokens/s on {PARTS['full'].title}: {ratio}x")
    if "dpo" in rates and "full" in rates:
        goals.append((f"{PARTS['dpo'].title} >= {DPO_OVER_SFT:.1f}x the loop's own SFT step (the full fine-tune's "
                      "run, the same rows)", rates["dpo"] / rates["full"], DPO_OVER_SFT))

    print(f"\nmemory: tools/estimate_memory.py for one GPU (--checkpointing) against the loop's measured peak "
          f"(torch.cuda.max_memory_allocated){'' if on_gpu else '; on CPU the peak is resident memory, no check'}")
    for title, est, measured in memory:
        off = est / measured - 1 if measured else float("nan")
        verdict = ("PASS" if abs(off) <= MEMORY_TOLERANCE else "FAIL: correct the estimate") if on_gpu else "-"
        print(f"  {title:44s} estimate {est:7.2f} GB  measured {measured:7.2f} GB  {off:+7.1%}  {verdict}")

    print(f"\ngoals{'' if on_gpu else ' (on CPU: ratios of toy runs, not the goals hardware)'}:")
    for name, ratio, goal in goals:
        verdict = "PASS" if math.isfinite(ratio) and ratio >= goal else "FAIL"
        print(f"  goal: {name}: {fmt(ratio, '.2f', 0)}x {verdict}")
    for name, ok in lines:
        print(f"  loss falls: {name}: {'PASS' if ok else 'FAIL'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("batch", help="the largest micro-batch the loop and its baseline fit in")
    b.add_argument("model")
    b.add_argument("--part", choices=list(PARTS), default="full")
    b.add_argument("--seq-len", type=int, default=4096)
    b.add_argument("--memory-gb", type=float, help="the device's memory (default: this GPU's)")
    b.add_argument("--share", type=float, default=0.8, help="of the memory the estimate may fill")
    b.add_argument("--cap", type=int, default=8, help="the largest micro-batch tried (a power of two)")
    q = sub.add_parser("pairs", help="TRL's micro-batch: the pairs of a loop micro-batch, over its accumulation")
    q.add_argument("model")
    q.add_argument("pairs")
    q.add_argument("--seq-len", type=int, default=4096)
    q.add_argument("--micro-batch", type=int, required=True, help="the loop's rows a step")
    q.add_argument("--accumulation", type=int, default=1, help="TRL's micro-batches a step")
    r = sub.add_parser("report", help="the table, the memory check and the goals")
    r.add_argument("work", type=Path)
    r.add_argument("--seq-len", type=int, default=4096)
    r.add_argument("--batch", nargs="+", default=[], metavar="PART=N", help="the parts that ran and their batch")
    a = p.parse_args(argv)
    if a.command == "batch":
        if a.memory_gb is None and not torch.cuda.is_available():
            p.error("batch: no GPU here; say --memory-gb")
        memory = a.memory_gb or torch.cuda.get_device_properties(0).total_memory / estimate.GB
        print(largest_batch(a.model, PARTS[a.part], a.seq_len, memory, a.share, a.cap))
        return 0
    if a.command == "pairs":
        from tools.bench.dpo import pairs_per_row

        per_row = pairs_per_row(a.model, Path(a.pairs), a.seq_len)
        print(max(1, round(a.micro_batch * per_row / a.accumulation)))
        return 0
    try:
        batches = {k: int(v) for k, _, v in (x.partition("=") for x in a.batch)}
    except ValueError:
        p.error(f"--batch: PART=N pairs, got {' '.join(a.batch)}")
    unknown = set(batches) - set(PARTS)
    if unknown:
        p.error(f"--batch: unknown part {sorted(unknown)}: one of {list(PARTS)}")
    return report(a.work, a.seq_len, batches)


if __name__ == "__main__":
    sys.exit(main())
