"""One long packed row on CPU: the peak memory of each process with sequence parallelism 1 and 2, side by side.

Two processes of real ZeRO-3 (accelerate_configs/cpu_zero3.yaml, bf16, gloo) train a tiny GPTBigCode (built
here, no dropout) on rows of --seq-len tokens (16,384 by default) packed from a corpus built here
(tools/bench/corpus.py), one row a process a step, gradient checkpointing off unless asked. With sequence
parallelism 1 each process trains a whole row (data parallelism over the two); with 2 the two processes share
each row (Ulysses: half its tokens each). The figure is each rank's own peak proportional set size (PSS of
/proc/PID/smaps_rollup, sampled every 50 ms: the pages a rank shares with the other split between them, never
summed over ranks), the larger rank's reported. The same run on --base-len-token rows gives what is not the
row's (weights, optimizer states, libraries): the difference is the long row's part, which should about halve
with 2. Each repeat runs every side, the order reversed every repeat, so load on a shared machine falls on all.

A checkout without the setting parallelism.sequence_parallel_size (issue 38.1) skips the 2 side with a line.

  python -m tools.bench.long_row [--seq-len 16384] [--sp 1 2] [--repeats 2] [--checkpointing] [--tiled-mlp 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tools.bench import corpus, measure, provenance

ROOT = Path(__file__).resolve().parents[2]
SHAPE = {"hidden": 256, "heads": 4, "layers": 4, "dropout": 0.0}  # 16k tokens: ~1 GB of activations a process


def config(a, work: Path, model: Path, data: Path, seq_len: int, out: Path) -> Path:
    cfg = {"model": {"name_or_path": str(model), "gradient_checkpointing": a.checkpointing}
           | ({"tiled_mlp": a.tiled_mlp} if a.tiled_mlp else {})
           | ({"offload_checkpoints": True} if a.offload_checkpoints else {}),
           "data": {"train_files": [str(data)], "seq_len": seq_len, "eval_fraction": 0.0,
                    "cache_dir": str(work / "cache")},
           "training": {"max_steps": a.steps, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
                        "lr": 1e-4, "log_every": 1, "save_every": 10_000, "sample_prompts": [],
                        "loss_chunk_tokens": a.loss_chunk},
           "output": {"output_dir": str(out), "save": False, "overwrite_output_dir": True, "report_to": []}}
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rank_pss(launcher: int) -> dict[int, int]:
    """Each rank's PSS in kB now: the processes under the launcher that carry a RANK (torchrun's workers)."""
    import psutil

    got = {}
    try:
        children = psutil.Process(launcher).children(recursive=True)
    except psutil.Error:
        return got
    for p in children:
        try:  # a process may end (or be a zombie) between the listing and these reads
            rank = p.environ().get("RANK")
            training = "train.py" in " ".join(p.cmdline())
        except psutil.Error:
            continue
        if rank is not None and training:
            got[int(rank)] = measure._pss_kb(p.pid)
    return got


def run(a, work: Path, model: Path, data: Path, seq_len: int, sp: int, name: str) -> dict:
    """One 2-process run; each rank's peak PSS (GB) and the wall time."""
    cfg = config(a, work, model, data, seq_len, work / name)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_zero3.yaml"), "--num_processes", "2", "--mixed_precision", "bf16",
           "--main_process_port", str(29400 + os.getpid() % 500), str(ROOT / "loop" / "train.py"), str(cfg)]
    if sp > 1:
        cmd += ["--parallelism.sequence_parallel_size", str(sp)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")} | {
        "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log = (work / f"{name}.log").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for rank, kb in rank_pss(proc.pid).items():
            peaks[rank] = max(peaks.get(rank, 0), kb)
        time.sleep(0.05)
    log.close()
    if proc.returncode != 0:
        tail = (work / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{tail}")
    return {"pss_gb": [peaks[r] / 1024**2 for r in sorted(peaks)], "wall_s": time.perf_counter() - started}


def spread(values: list[float], form: str) -> str:
    if len(values) == 1:
        return format(values[0], form)
    return f"{format(statistics.median(values), form)} ({format(min(values), form)}-{format(max(values), form)})"


def report(a, sides: list[int], runs: dict) -> None:
    print(f"{'sequence parallel':18s} {'peak PSS/process, ' + str(a.seq_len) + ' tok':>30s} "
          f"{'at ' + str(a.base_len) + ' tok':>22s} {'the row s part':>20s} {'x SP 1':>8s} {'wall s':>8s}")
    part = {sp: [max(long["pss_gb"]) - max(base["pss_gb"]) for long, base in zip(runs[sp, a.seq_len],
                                                                              runs[sp, a.base_len])] for sp in sides}
    for sp in sides:
        ratio = [p / q for p, q in zip(part[sp], part[sides[0]])]
        print(f"{sp:<18d} {spread([max(r['pss_gb']) for r in runs[sp, a.seq_len]], '.3f'):>30s} "
              f"{spread([max(r['pss_gb']) for r in runs[sp, a.base_len]], '.3f'):>22s} "
              f"{spread(part[sp], '.3f'):>20s} {spread(ratio, '.2f'):>8s} "
              f"{spread([r['wall_s'] for r in runs[sp, a.seq_len]], '.0f'):>8s}")
    for sp in sides:
        each = "; ".join(", ".join(f"{g:.3f}" for g in r["pss_gb"]) for r in runs[sp, a.seq_len])
        print(f"sequence parallel {sp}: each rank's peak PSS (GB) at {a.seq_len} tokens, per repeat: {each}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384, help="tokens of the long row")
    p.add_argument("--base-len", type=int, default=1024, help="the short row whose peak is subtracted")
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2], help="sequence-parallel sizes (1 or 2: 2 processes)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps a run (one row a process each)")
    p.add_argument("--tiled-mlp", type=int, default=0, help="model.tiled_mlp")
    p.add_argument("--offload-checkpoints", action="store_true", help="model.offload_checkpoints (on CPU the "
                   "offloader has nowhere to move them: the same memory, the code path exercised)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="training.loss_chunk_tokens: the loss head's float32 "
                   "logits for this many tokens at a time (the loop's 8,192 would be the whole of a half row here)")
    p.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing (default off: every "
                   "activation is then the row's, so its halving stands well above the noise of the rest)")
    p.add_argument("--shape", type=yaml.safe_load, default=SHAPE, help="the tiny model's shape (YAML mapping)")
    p.add_argument("--work", type=Path, help="keep the model, data and runs here (default: a temporary folder)")
    a = p.parse_args(argv)
    if any(sp not in (1, 2) for sp in a.sp):
        p.error("--sp takes 1 and 2 (two processes)")
    from tools.builders import tiny

    sides = sorted(set(a.sp))
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, chat = work / "model", work / "chatterbot.jsonl"
        if not (model / "config.json").is_file():
            tiny.build(model, chat, positions=a.seq_len, **a.shape)
        # Enough dialogues for every step's two rows, with room: realistic answers are ~300 tokens a dialogue.
        data = corpus.build(chat, work / "long.jsonl", max(50, a.steps * 2 * a.seq_len // 150))
        said = provenance.Said.start()
        runs: dict[tuple[int, int], list[dict]] = {}
        for repeat in range(a.repeats):
            order = [(sp, n) for sp in sides for n in (a.seq_len, a.base_len)]
            for sp, n in order if repeat % 2 == 0 else order[::-1]:
                runs.setdefault((sp, n), []).append(run(a, work, model, data, n, sp, f"sp{sp}-{n}-{repeat}"))
    print(f"tiny GPTBigCode ({a.shape}), one {a.seq_len}-token packed row a process a step, 2 processes, ZeRO-3 "
          f"bf16 on CPU, gradient checkpointing {'on' if a.checkpointing else 'off'}, tiled MLP "
          f"{a.tiled_mlp or 'off'}{', checkpoints offloaded' if a.offload_checkpoints else ''}, loss in chunks "
          f"of {a.loss_chunk} tokens, {a.steps} steps a run; {a.repeats} repeats, sides interleaved")
    report(a, sides, runs)
    print(said.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
