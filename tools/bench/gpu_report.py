"""The table gpu_check.sh ends with: the loop's runs (read from their TensorBoard logs, warm-up
window left out) next to the Trainer baseline and the plain-PyTorch ceiling, with the ratios; then
what the profiler saw of a few steps of each (loop/report/profiling.py), recorded after the measured ones.

  python -m tools.bench.gpu_report WORK_DIR sdpa varlen_attn varlen_attn+memory_efficient_linear=false ...
  python -m tools.bench.gpu_report --dpo WORK_DIR varlen_attn 12    # the DPO rows (run-varlen_attn+dpo)

Each name is a run folder `run-NAME`: an attention choice, then `+` and the ZeRO settings it changed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged to its TensorBoard, as (step, value) in order."""
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def windows(run: Path, until: int | None = None) -> dict[str, float]:
    """Each scalar's mean over the logging windows after the first (which holds start-up), up to step
    `until` (the profiled steps that follow are slower)."""
    out = {}
    for tag, logged in scalars(run).items():
        values = [v for step, v in logged if until is None or step <= until]
        out[tag] = statistics.mean(values[1:] or values)
    return out


def profile(folder: Path) -> dict:
    path = folder / "summary-rank0.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def result(path: Path) -> dict:
    lines = path.read_text().strip().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


def main(work: str, *attns: str) -> int:
    root = Path(work)
    trainer, ceiling = result(root / "trainer.json"), result(root / "ceiling.json")
    w = max([28] + [len(f"loop/train.py {attn}") for attn in attns])
    print(f"{'run':{w}s} {'tokens/s':>10s} {'MFU':>6s} {'peak GB':>8s} {'data ms':>8s} {'fwd+bwd ms':>11s} "
          f"{'optim ms':>9s} {'x Trainer':>10s} {'x ceiling':>10s}")
    rate = lambda r: r.get("tokens_per_s") or float("nan")  # noqa: E731
    profiles = {f"loop/train.py {attn}": profile(root / f"run-{attn}" / "profile") for attn in attns}
    for attn in attns:
        if not (root / f"run-{attn}" / "tensorboard").is_dir():
            print(f"{'loop/train.py ' + attn:{w}s} failed before its first step: see run-{attn}.log")
            continue
        first = profiles[f"loop/train.py {attn}"].get("first")
        s = windows(root / f"run-{attn}", first - 2 if first else None)
        tps = s.get("throughput/tokens_per_s", float("nan"))
        ms = lambda tag: 1000 * s.get(f"time/{tag}", float("nan"))  # noqa: E731, B023
        print(f"{'loop/train.py ' + attn:{w}s} {tps:10,.0f} {s.get('throughput/mfu', float('nan')):6.1%} "
              f"{s.get('memory/peak_bytes', float('nan')) / 2**30:8.1f} {ms('data'):8.1f} "
              f"{ms('forward_backward'):11.1f} {ms('optimizer'):9.1f} "
              f"{tps / rate(trainer):10.2f} {tps / rate(ceiling):10.2f}")
    for name, r in (("HF Trainer + DeepSpeed ZeRO-3", trainer), (f"ceiling ({ceiling.get('attention')})", ceiling)):
        mfu = f"{r['mfu']:6.1%}" if r.get("mfu") else f"{'-':>6s}"
        print(f"{name:{w}s} {rate(r):10,.0f} {mfu} {r.get('peak_bytes', 0) / 2**30:8.1f}")
    profiles |= {"HF Trainer + DeepSpeed ZeRO-3": profile(root / "profile-trainer"),
                 "ceiling": profile(root / "profile-ceiling")}
    print(f"\n{'profiled (3 steps)':{w}s} {'step ms':>8s} {'host ms':>8s} {'device busy':>12s} {'operators':>10s} "
          f"{'launches':>9s} {'syncs':>6s}  (per step)")
    for name, p in profiles.items():
        if p:
            busy = f"{p['device_busy']:12.0%}" if p["device_busy"] is not None else f"{'-':>12s}"
            print(f"{name:{w}s} {p['step_ms']:8.1f} {p.get('host_ms', float('nan')):8.1f} {busy} "
                  f"{p['operators_per_step']:10,.0f} {p['launches_per_step']:9,.0f} {p['syncs_per_step']:6.1f}")
    return 0


def preference(work: str, attn: str, trl_pairs: str) -> int:
    """The DPO rows: the loop's DPO run against its SFT run with the same attention and rows, and against
    TRL's DPOTrainer on the same pairs (its micro-batch: `trl_pairs` pairs, a loop micro-batch's worth)."""
    root = Path(work)
    run = root / f"run-{attn}+dpo"
    if not (run / "tensorboard").is_dir():
        print(f"loop/train.py DPO failed before its first step: see {run}.log")
        return 0
    first = profile(run / "profile").get("first")
    dpo = windows(run, first - 2 if first else None).get("throughput/tokens_per_s", float("nan"))
    first = profile(root / f"run-{attn}" / "profile").get("first")
    sft = windows(root / f"run-{attn}", first - 2 if first else None).get("throughput/tokens_per_s", float("nan")) \
        if (root / f"run-{attn}" / "tensorboard").is_dir() else float("nan")
    trl = result(root / "dpo-trl.json").get("tokens_per_s") or float("nan")
    print(f"\n{'preference tuning':34s} {'tokens/s':>10s} {'x SFT':>7s} {'x TRL':>7s}")
    for name, rate in ((f"loop/train.py DPO {attn}", dpo), (f"loop/train.py SFT {attn}", sft),
                       (f"TRL DPOTrainer ({trl_pairs} pairs a batch)", trl)):
        print(f"{name:34s} {rate:10,.0f} {rate / sft:7.2f} {rate / trl:7.2f}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dpo", action="store_true", help="the DPO rows: NAMES are the attention and TRL's pairs a batch")
    p.add_argument("work", help="the folder of the runs (run-NAME) and the baselines' JSON")
    p.add_argument("names", nargs="+", help="the runs to report (with --dpo: ATTENTION PAIRS)")
    a = p.parse_args()
    if a.dpo and len(a.names) != 2:
        p.error("--dpo takes WORK ATTENTION PAIRS")
    sys.exit(preference(a.work, *a.names) if a.dpo else main(a.work, *a.names))
