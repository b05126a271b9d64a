"""Preemption signals are recorded while training and the previous handlers come back after."""

import os
import signal

import pytest

from loop.state import preemption


def test_signals_are_recorded_inside_and_restored_outside():
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(KeyError), preemption.Preemption() as preempt:
        assert not preempt.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end this test process outside the block
        assert preempt.requested and preempt.describe() == "signal SIGUSR1, SIGTERM"
        raise KeyError("any way out of the block")
    assert signal.getsignal(signal.SIGUSR1) is before
