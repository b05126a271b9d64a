"""Turn a training checkpoint into a Hugging Face model directory, whichever engine wrote it.

From a DeepSpeed ZeRO-3 checkpoint it reads the fp32 master weights of every rank (one tensor at a time),
from a run without DeepSpeed (one process or DDP) its whole weights, and writes
sharded safetensors (a single file when small) with an index, plus the run's model config,
tokenizer, chat template and generation config. Tied weights are written once and come back tied.
Nothing that looks like a finished model is left in OUTPUT_DIR if anything fails.

  python tools/consolidate_checkpoint.py outputs/quickstart/checkpoints outputs/quickstart/consolidated
  python tools/consolidate_checkpoint.py RUN/checkpoints/step_00000500 MODEL --dtype fp32 --max-shard-size 2GB --verify

CHECKPOINT_DIR may be one checkpoint (step_N) or a run's checkpoints/ folder (its newest intact one, with a
warning for each newer one that is broken). Only complete checkpoints whose every file still has the size
and digest it was saved with are read; the step is the one the checkpoint's loop state records. Exit 2
when the input cannot be used (or OUTPUT_DIR cannot be written), 1 when writing failed (a full disk).
A LoRA run's checkpoint gives the adapter (what peft.PeftModel.from_pretrained loads onto the base), or
with --merged the base model with the adapter merged in (the base is the one the run started from).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from loop.config import ConfigError
from loop.report import timings
from loop.state import checkpoints, consolidate, export, rundir

VERIFY_PROMPTS = ["Write a Python function that reverses a string.", "What is a linked list?"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_dir", type=Path)
    p.add_argument("output_dir", type=Path)
    p.add_argument("--dtype", choices=sorted(export.DTYPES), default="bf16",
                   help="dtype of the written weights (default bf16; the masters are fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 200MB")
    p.add_argument("--merged", action="store_true",
                   help="LoRA checkpoints: write the base with the adapter merged in, instead of the adapter")
    p.add_argument("--verify", action="store_true",
                   help="reload with from_pretrained, compare weights and logits with the checkpoint")
    a = p.parse_args(argv)
    started = time.monotonic()
    try:
        max_shard = consolidate.parse_size(a.max_shard_size)
        rundir.check_writable(a.output_dir, "OUTPUT_DIR")
        bars: list[tqdm] = []  # made at the first tensor: an adapter or a merge streams no shards, so shows none
        count = [0]

        def progress(name: str, nbytes: int) -> None:
            if not bars:
                # On a terminal only: into a log, each refresh would be a line of its own (52 seen).
                bars.append(tqdm(unit="B", unit_scale=True, desc="consolidate", disable=None))
            count[0] += 1
            bars[0].set_postfix(tensors=count[0])
            bars[0].update(nbytes)

        try:
            if a.merged:
                done = export.merged_from_checkpoint(a.checkpoint_dir, a.output_dir, a.dtype)
            else:
                done = export.from_checkpoint(a.checkpoint_dir, a.output_dir, a.dtype, max_shard, progress)
        finally:
            for bar in bars:
                bar.close()
    except (ConfigError, checkpoints.CheckpointError, consolidate.ConsolidationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except export.ExportError as e:  # the model could not be written whole (a full disk, a shape that is wrong)
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in done.passed_over:
        print(f"warning: {note}", file=sys.stderr)
    tied = f"; tied, written once: {done.aliases}" if done.aliases else ""
    print(f"wrote {a.output_dir} from {done.checkpoint} (step {done.step}, {a.dtype}){tied}")
    if a.verify:
        report = consolidate.verify(done.checkpoint, a.output_dir, export.DTYPES[a.dtype], VERIFY_PROMPTS)
        print("verify: " + ", ".join(f"{k}={v:.3g}" for k, v in report.items()))
        if report["max_diff_vs_cast_master"] != 0:
            print("error: saved weights differ from the checkpoint", file=sys.stderr)
            return 1
    if run := timings.run_dir_of(a.checkpoint_dir):  # a run's checkpoint: the quickstart's summary gets this step
        timings.record(run, {"consolidation": time.monotonic() - started})
    return 0


if __name__ == "__main__":
    sys.exit(main())
