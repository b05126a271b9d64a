"""What only a mixture of experts' user needs to see: per layer, the share of tokens each expert received and
the router's entropy, as TensorBoard scalars per logging window, and a train.log line when an expert gets
less than a fraction of its fair share (expert collapse), which shows long before the eval loss does."""

from __future__ import annotations

import logging

from loop.model.moe import Routing


class RoutingWindow:
    """The routing of the steps of one logging window, averaged over them."""

    def __init__(self, collapse_fraction: float):
        self.collapse_fraction = collapse_fraction
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.shares: list[list[float]] = []
        self.entropy: list[float] = []

    def add(self, routing: Routing | None) -> None:
        if routing is None:
            return
        if not self.steps:
            self.shares = [[0.0] * len(layer) for layer in routing.shares]
            self.entropy = [0.0] * len(routing.entropy)
        self.steps += 1
        for mine, theirs in zip(self.shares, routing.shares):
            mine[:] = [a + b for a, b in zip(mine, theirs)]
        self.entropy = [a + b for a, b in zip(self.entropy, routing.entropy)]

    def scalars(self) -> dict[str, float]:
        """router/layer_L/expert_E (share of the layer's assignments; fair: 1 / experts) and
        router/layer_L/entropy (nats; uniform routing: log experts)."""
        out: dict[str, float] = {}
        for layer, (shares, entropy) in enumerate(zip(self.shares, self.entropy)):
            out |= {f"router/layer_{layer}/expert_{e}": s / self.steps for e, s in enumerate(shares)}
            out[f"router/layer_{layer}/entropy"] = entropy / self.steps
        return out

    def collapsed(self) -> list[str]:
        """One phrase per layer where some expert got under collapse_fraction of its fair share."""
        found = []
        for layer, shares in enumerate(self.shares):
            fair = 1 / len(shares)
            starved = [e for e, s in enumerate(shares) if s / self.steps < self.collapse_fraction * fair]
            if starved:
                found.append(f"layer {layer}: experts {', '.join(map(str, starved))}")
        return found

    def log(self, accelerator, step: int) -> None:
        """Close the window: the scalars to the trackers, and a warning line for collapsed experts."""
        if not self.steps:
            return
        accelerator.log(self.scalars(), step=step)
        collapsed = self.collapsed() if self.collapse_fraction > 0 else []
        if collapsed and accelerator.is_main_process:
            logging.getLogger("loop").warning(
                f"step {step}: expert collapse: under {self.collapse_fraction:g} of their fair share of tokens over "
                f"the last {self.steps} steps: {'; '.join(collapsed)} (model.expert_collapse_fraction)")
        self._reset()
