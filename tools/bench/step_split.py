"""Where the loop's CPU step goes, call by call: loop/train.py run in this process under cProfile, and each
part of an optimizer step (forward, backward, clipping, the optimizer, the host read of the step's sums) and
of the loop's own bookkeeping around it (metrics, logging, the evaluation, sample, checkpoint, code-evaluation
and profiler checks, the progress bar) as milliseconds a step, averaged over every step of the run.

cProfile adds a little to each Python call, so the bookkeeping rows are upper bounds; the compute rows are
torch's own time. Takes a run config (tools/bench/train_step.py --work DIR leaves one as DIR/ours.yaml).

  python -m tools.bench.step_split RUN.yaml
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

# (what, file the function lives in, its name): the step's parts, then the loop's own bookkeeping.
STEP = (("forward (model and chunked loss)", "loop/model/head.py", "summed_cross_entropy"),
        ("backward", "loop/engine/step.py", "backward"),
        ("batch to device, block mask", "loop/data/batches.py", "to_device"),
        ("gradient clipping", "loop/engine/step.py", "clip_gradients"),
        ("optimizer", "loop/engine/step.py", "optimizer_step"),
        ("all-reduce of the step's sums", "accelerate/accelerator.py", "reduce"),
        ("host read of the sums (.tolist(), the one sync)", "~", "<method 'tolist' of 'torch._C.TensorBase' objects>"))
BOOKKEEPING = (("data wait (prefetched)", "loop/data/batches.py", "steps"),
               ("learning rate", "loop/training/optim.py", "lr_at"),
               ("loop state", "loop/state/progress.py", "advance"),
               ("metrics window", "loop/report/metrics.py", "add"),
               ("logging (a window every log_every)", "loop/report/metrics.py", "maybe_log"),
               ("evaluation check", "loop/evaluation/held_out.py", "maybe_evaluate"),
               ("samples check", "loop/inference/sampling.py", "maybe_sample"),
               ("checkpoint check", "loop/state/saver.py", "maybe_save"),
               ("code-evaluation check", "loop/evaluation/during_training.py", "__call__"),
               ("progress bar", "tqdm/std.py", "update"),
               ("progress bar postfix", "tqdm/std.py", "set_postfix"))


def cumulative(stats: pstats.Stats, where: str, name: str) -> float:
    return sum(row[3] for (path, _, func), row in stats.stats.items() if func == name and path.endswith(where))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a run config for loop/train.py")
    a = p.parse_args(argv)
    import loop.train

    profile = cProfile.Profile()
    profile.enable()
    loop.train.main([a.config])
    profile.disable()
    stats = pstats.Stats(profile)
    steps = sum(row[1] for (path, _, func), row in stats.stats.items()
                if func == "train_step" and path.endswith("loop/training/step.py"))
    whole = cumulative(stats, "loop/training/step.py", "train_step") / steps
    parts = [(what, cumulative(stats, where, name) / steps) for what, where, name in STEP + BOOKKEEPING]
    print(f"{steps} steps of {a.config}; train_step {1000 * whole:.1f} ms a step; its parts, and bookkeeping:")
    for what, seconds in parts:
        print(f"  {what:50s} {1000 * seconds:10.3f} ms  {seconds / whole:8.3%}")
    print(f"  {'bookkeeping outside train_step, in all':50s} {1000 * sum(s for _, s in parts[len(STEP):]):10.3f} ms")
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


if __name__ == "__main__":
    main()
