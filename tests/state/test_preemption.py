"""Preemption signals (and Ctrl-C) are recorded while training and the previous handlers come back after."""

import os
import signal
import subprocess
import sys

import pytest

from loop.state import preemption
from loop.state.preemption import exit_code


def test_signals_are_recorded_inside_and_restored_outside():
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(KeyError), preemption.Preemption() as preempt:
        assert not preempt.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end this test process outside the block
        assert preempt.requested and preempt.describe() == "signal SIGUSR1, SIGTERM"
        raise KeyError("any way out of the block")
    assert signal.getsignal(signal.SIGUSR1) is before


def test_the_first_ctrl_c_is_recorded_and_the_second_stops_at_once():
    """The first SIGINT waits for the step and its checkpoint (exit 130); the second is not waited for."""
    script = ("import os, signal, time\n"
              "from loop.state.preemption import Preemption\n"
              "with Preemption() as p:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    print(p.describe(), p.exit_code, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(30)\n"
              "    print('still running', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGINT, done.stderr
    assert done.stdout == "signal SIGINT 130\n"


def test_a_scheduler_signal_asks_for_a_requeue_and_ctrl_c_does_not():
    assert exit_code([signal.SIGTERM]) == 75 and exit_code([signal.SIGUSR1, signal.SIGINT]) == 130
