"""The routing a mixture of experts' user sees: per layer and expert the share of tokens and the router's
entropy averaged over a logging window, and one train.log line naming the experts that starve."""

import logging

from loop.model.moe import Routing
from loop.report.routing import RoutingWindow


class Tracker:
    is_main_process = True

    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))


def test_shares_and_entropy_are_averaged_over_the_window_and_a_starving_expert_is_named(caplog):
    window, tracker = RoutingWindow(collapse_fraction=0.1), Tracker()
    window.add(Routing(2.0, [[0.5, 0.5, 0.0, 0.0], [0.25] * 4], [0.7, 1.38]))
    window.add(Routing(2.0, [[0.3, 0.5, 0.2, 0.0], [0.25] * 4], [0.9, 1.38]))
    window.add(None)  # a dense model's step, or a skipped one
    with caplog.at_level(logging.WARNING, logger="loop"):
        window.log(tracker, step=10)
    (step, values), = tracker.logged
    assert step == 10 and values["router/layer_0/expert_0"] == 0.4 and values["router/layer_0/expert_2"] == 0.1
    assert values["router/layer_0/entropy"] == 0.8 and values["router/layer_1/expert_3"] == 0.25
    (line,) = [r.getMessage() for r in caplog.records]
    # Fair is 1/4: expert 3 got nothing, expert 2 0.1 (above 0.1 * 1/4): only expert 3 of layer 0 is named.
    assert "step 10: expert collapse" in line and "layer 0: experts 3" in line and "layer 1" not in line
    window.log(tracker, step=20)  # a new window: nothing added, nothing logged
    assert len(tracker.logged) == 1


def test_a_zero_fraction_never_warns(caplog):
    window, tracker = RoutingWindow(collapse_fraction=0.0), Tracker()
    window.add(Routing(2.0, [[1.0, 0.0]], [0.0]))
    with caplog.at_level(logging.WARNING, logger="loop"):
        window.log(tracker, step=1)
    assert not caplog.records and tracker.logged
