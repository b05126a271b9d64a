"""Preemption: a scheduler's SIGTERM or SIGUSR1 becomes a checkpoint and exit code 75 (requeue me).

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
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def follow_launcher() -> None:
    """A worker started by a launcher gets SIGTERM when the launcher dies (Linux): each worker runs in a
    process group of its own, so killing the launcher's group would otherwise leave them training. The
    signal then ends the run like a preemption: one more checkpoint, exit 75."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher was already gone before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Preemption:
    """While active, SIGTERM / SIGUSR1 are recorded instead of killing the process; the previous
    handlers come back on exit, whichever way the block ends."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)

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
