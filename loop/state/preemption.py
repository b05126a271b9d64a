"""Preemption: a scheduler's SIGTERM or SIGUSR1 becomes a checkpoint and exit code 75 (requeue me); the
first Ctrl-C (SIGINT) does the same and exits 130, as an interrupted program does; a second Ctrl-C stops
at once (the checkpoint being written, if any, is never marked complete, so the previous one stays latest).

A signal reaches the processes at different moments, so no process acts on its own: each optimizer
step, the processes agree (one collective, shared with the step's loss) whether any of them saw
one, and then all of them save and stop together.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was written; requeue the job to continue.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # 130: what a shell reports for Ctrl-C; a user stopped it, no requeue
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def exit_code(signals: list[int]) -> int:
    """130 when the stop was a Ctrl-C, 75 (requeue) for a scheduler's signal."""
    return INTERRUPTED_EXIT_CODE if signal.SIGINT in signals else PREEMPTED_EXIT_CODE


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send `signum` to this process when its parent dies (a no-op elsewhere); usable as a
    `preexec_fn`."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def follow_launcher() -> None:
    """A worker started by a launcher gets SIGTERM when the launcher dies (Linux): each worker runs in a
    process group of its own, so killing the launcher's group would otherwise leave them training. The
    signal then ends the run like a preemption: one more checkpoint, exit 75."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:  # the launcher was already gone before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Preemption:
    """While active, SIGTERM / SIGUSR1 / SIGINT are recorded instead of killing the process (after the
    first SIGINT, the next one ends the process at once); the previous handlers come back on exit,
    whichever way the block ends."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def exit_code(self) -> int:
        return exit_code(self.received)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        if signum == signal.SIGINT:  # the second Ctrl-C is not waited for: the OS ends the process
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if os.isatty(2):  # os.write: a handler may run while tqdm is inside a write to stderr
                os.write(2, b"\nstopping after this step, with a checkpoint; Ctrl-C again stops at once\n")

    def __enter__(self) -> Preemption:
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def describe(self) -> str:
        names = [signal.Signals(s).name for s in self.received]
        return f"signal {', '.join(names)}" if names else "signal on another process"
