"""Launching a run so that a scheduler can drive it: check first, forward signals, exit 75 on preemption.

`accelerate launch` runs the workers under torchrun, which reports any non-zero worker exit as its own
failure (exit 1 with a traceback) and, when it gets SIGTERM itself, kills the workers 30 seconds later,
too soon for a large model's checkpoint. This front end adds what a requeue script needs:

1. The run's config, model config (its size against the machine's memory), output directory and data are
   checked before anything starts (the data is prepared into its cache on the way); a problem is one line and
   exit 2, and nothing is launched or written.
2. SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) sent to it go straight to the training processes, which save and
   stop together. The launcher runs in a session of its own so that a terminal's Ctrl-C reaches the workers
   once, through this process, and not a second time through torchrun (a second Ctrl-C stops at once).
3. When the run stopped on a signal (it leaves OUTPUT_DIR/PREEMPTED), the launch exits as the run did: 75
   for a preemption, 130 for Ctrl-C.
4. Any other failure exits with the run's own exit code (2 for a user error, which the run has already said
   in one line), without the launcher's traceback: torchrun's failure summary is printed only for a failure
   the run did not explain.

The top stage: the front end a user or a scheduler starts, above everything a run is made of.

May import: loop.config, loop.processes, loop.data, loop.engine, loop.model, loop.training, loop.state,
loop.report, loop.inference, loop.evaluation.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from loop import config
from loop.data import templates
from loop.model.load import check_memory, load_tokenizer, preflight
from loop.report import trackers
from loop.state import preemption, rundir
from loop.training import registry


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch options, [training script, its arguments])."""
    script = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
    if script is None:
        raise config.ConfigError("usage: tools/launch.py [accelerate launch options] loop/train.py CONFIG "
                                 "[--key value ...]")
    return argv[:script], argv[script:]


def check(train_args: list[str]) -> config.Config:
    """What the run would refuse, refused before launching: config, model, every data record. The data is
    prepared here, into the cache the training processes then start from."""
    cfg = config.from_argv(train_args)
    trackers.check(cfg.output.report_to)
    objective = registry.pick(cfg)
    model_config, _, _ = preflight(cfg, objective.dropout)
    check_memory(model_config, cfg)
    rundir.check_writable(Path(cfg.output.output_dir))
    rundir.check_fresh(Path(cfg.output.output_dir), cfg.output.resume_from_checkpoint, cfg.output.overwrite_output_dir)
    tokenizer = load_tokenizer(cfg)
    templates.install(tokenizer, cfg.data.template)
    objective.check_data(cfg, tokenizer)
    return cfg


def workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(launcher.pid).children(recursive=True)
                if any(a.endswith("train.py") for a in p.cmdline())]
    except psutil.Error:
        return []


def run(argv: list[str]) -> int:
    try:
        launcher_args, train_args = split(argv)
        cfg = check(train_args[1:])
    except config.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    marker = Path(cfg.output.output_dir) / rundir.PREEMPTED
    started = time.time()
    launcher = subprocess.Popen([sys.executable, "-m", "loop.launch", *launcher_args, *train_args],
                                start_new_session=True, preexec_fn=preemption.die_with_parent)

    def forward(signum, _frame) -> None:
        for worker in workers(launcher):
            worker.send_signal(signum)

    for s in preemption.SIGNALS:
        signal.signal(s, forward)
    code = launcher.wait()
    if marker.is_file() and marker.stat().st_mtime >= started:
        said = dict(line.split(" ", 1) for line in marker.read_text().splitlines() if " " in line)
        return int(said.get("exit", preemption.PREEMPTED_EXIT_CODE))
    return code


def accelerate_launch(argv: list[str]) -> int:
    """`accelerate launch ARGV` in this process, exiting as the run did. accelerate turns any failed worker into
    exit 1 and a traceback of its own launcher, with torchrun's summary at the end; a user error the workers
    have said (loop/processes.py fail_together writes "error: ..." into torch's elastic error file) needs
    neither, and any other failure gets the summary alone."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(launch_command_parser().parse_args(argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        if not (isinstance(failure.message, str) and failure.message.startswith("error: ")):
            print(e, file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # a signal: 128 + its number
    return 0


if __name__ == "__main__":  # run by run() above as `python -m loop.launch ACCELERATE_ARGS SCRIPT ARGS`
    sys.exit(accelerate_launch(sys.argv[1:]))
