"""What the run reports: the logging window's scalars, the time split, FLOPs."""

import time

import pytest
import torch

from loop import metrics


def test_the_window_averages_trained_steps_and_counts_every_step():
    timers = metrics.Timers(torch.device("cpu"))
    meter = metrics.Meter(world=2, peak_flops=1e9, flops=lambda pieces: 10.0 * sum(pieces),
                          packing_efficiency=0.97, timers=timers)
    with timers("forward_backward"):
        time.sleep(0.01)
    meter.add(tokens=100, trained=40, piece_lengths=[60, 40], loss=2.0, grad_norm=torch.tensor(3.0))
    meter.add(tokens=50, trained=20, piece_lengths=[50], loss=None, grad_norm=float("inf"))  # a skipped step
    meter.add(tokens=100, trained=30, piece_lengths=[100], loss=4.0, grad_norm=torch.tensor(1.5))
    scalars = meter.scalars(lr=1e-4, epoch=0.5, tokens_trained=70)
    assert scalars["train/loss"] == 3.0  # the skipped step adds no loss
    assert scalars["train/grad_norm"] == 1.5 and scalars["train/lr"] == 1e-4
    elapsed = 250 / scalars["throughput/tokens_per_s"]
    assert scalars["throughput/trained_tokens_per_s"] == pytest.approx(70 / elapsed)  # skipped: nothing trained
    assert scalars["throughput/tokens_per_s_per_device"] == pytest.approx(scalars["throughput/tokens_per_s"] / 2)
    assert scalars["throughput/mfu"] == pytest.approx(2500 / elapsed / 2 / 1e9)
    assert scalars["time/forward_backward"] == pytest.approx(0.01 / 3, rel=0.5)  # per step of the window
    again = meter.scalars(lr=1e-4, epoch=0.5, tokens_trained=70)
    assert again["throughput/tokens_per_s"] == 0 and "time/forward_backward" not in again  # a new window


def test_attention_flops_follow_each_dialogues_own_length_heads_and_window():
    from loop.models import Shape

    full = Shape(hidden=8, layers=2, q_heads=2, kv_heads=1, head_dim=4, vocab=10, max_positions=64,
                 windows=(None, None))
    packed = metrics.training_flops(1000, full, piece_lengths=[10, 10])
    assert packed == 6 * 1000 * 20 + 12 * 2 * 4 * 2 * (55 + 55)  # 55 causal pairs in 10 tokens, 2 layers
    assert metrics.training_flops(1000, full, piece_lengths=[20]) > packed  # one long dialogue costs more
    windowed = Shape(**{**full.__dict__, "windows": (None, 4)})
    assert metrics.training_flops(1000, windowed, [10]) == 6 * 1000 * 10 + 12 * 8 * (55 + 10 + 6 * 4)
