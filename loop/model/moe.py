"""Mixture-of-experts models: which routers the loop knows, and the router's load-balancing loss over every
real token of an optimizer step.

transformers computes the load-balancing loss (Switch Transformer's, `load_balancing_loss_func`) inside the
model's forward over one batch, with a 2-D padding mask: it cannot read the loop's packed layouts (it fails
on their 4-D mask), and a loss per micro-batch would change with the split of a step into processes and
micro-batches. Here the model's forward is told not to (`output_router_logits=False`, the saved config
keeps its value), the router logits are recorded by hooks on the router modules transformers itself records
them from, and the loss is formed once per step from sums over every real token on every process (padding
never; a packed token once):

    aux = E * sum_e f_e * P_e,   f_e = A_e / N,   P_e = S_e / N

A_e: the top-k assignments to expert e, S_e: its router probabilities, both summed over every MoE layer and
real token; N: the (layer, token) pairs. For one unpadded sequence this is transformers' value exactly.
The counts A carry no gradient, so the gradient is E / N^2 * sum_e A_e * grad S_e: linear in each
micro-batch's S. Each micro-batch's backward weighs its S by the step's counts, summed over the processes
first (one all-reduce of E numbers), which is exact for any number of processes. With gradient accumulation
the counts of the micro-batches still to come are not known at a micro-batch's backward: those seen so far
stand in for them (scaled to the step's N). The logged value is always exact.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from loop.config import ConfigError

# Model types whose router the loop knows: softmax over the experts, top-k, and transformers' Switch-style
# load-balancing loss (what this module reproduces over a step). Another router (sigmoid scores with a bias
# correction, DeepSeek-V3's; expert choice; ...) would need its own loss, so such a model is refused.
SOFTMAX_TOP_K = ("qwen3_moe", "qwen2_moe", "mixtral")
EXPERT_COUNT = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def recorder_of(model_class) -> tuple[type, int] | None:
    """The router module class transformers records router logits from, and the output index, or None
    for a model without routers."""
    spec = (getattr(model_class, "_can_record_outputs", None) or {}).get("router_logits")
    return None if spec is None else (spec.target_class, spec.index)


def experts_of(model_config) -> int:
    return next((n for n in (getattr(model_config, k, None) for k in EXPERT_COUNT) if isinstance(n, int)), 0)


def check(model_config, model_class) -> None:
    """Refuse, before any weight loads, a mixture of experts whose router the loop does not know."""
    kind = model_config.model_type
    if (recorder_of(model_class) or experts_of(model_config) > 1) and kind not in SOFTMAX_TOP_K:
        raise ConfigError(
            f"model.name_or_path: {kind} is a mixture of experts whose router the loop does not know, so its "
            f"load-balancing loss would be missing or wrong; supported: {', '.join(SOFTMAX_TOP_K)}")


@dataclass(frozen=True)
class Router:
    experts: int
    top_k: int
    coef: float  # the load-balancing loss's coefficient (0: not trained, still measured)
    source: str  # where the coefficient came from

    def describe(self) -> str:
        if not self.coef:
            return f"router load-balancing loss off ({self.source}); routing is still measured and logged"
        return f"router load-balancing loss on, coefficient {self.coef:g} ({self.source})"


def router(model_config, override: float | None) -> Router | None:
    """The router of a (known) mixture of experts and the coefficient its load-balancing loss trains with:
    model.router_aux_loss_coef when set, else the model config's."""
    if model_config.model_type not in SOFTMAX_TOP_K:
        return None
    own = float(getattr(model_config, "router_aux_loss_coef", 0.0) or 0.0)
    coef, source = (own, "the model config's router_aux_loss_coef") if override is None else \
        (float(override), "model.router_aux_loss_coef")
    return Router(experts_of(model_config), int(model_config.num_experts_per_tok), coef, source)


@dataclass
class Recorder:
    """Router logits of the training forward passes run inside `recording()`: not gradient checkpointing's
    recomputation in backward (it runs outside), nor a forward without gradients inside it (DPO's live
    reference, the model with its adapter off)."""

    router: Router
    layers: int
    logits: list[torch.Tensor] | None = field(default=None)

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        self.logits = []
        try:
            yield self.logits
        finally:
            self.logits = None

    def hook(self, index: int, module, inputs, output) -> None:
        if self.logits is not None and torch.is_grad_enabled():
            self.logits.append(output[index] if isinstance(output, (tuple, list)) else output)


def install(model: torch.nn.Module, model_config, override: float | None) -> Recorder | None:
    """Hooks that record the router logits, and the model's forward told not to compute transformers' own
    load-balancing loss (whatever its config says, which is saved as it was). None for a dense model."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA adapters
    spec = router(model_config, override)
    found = recorder_of(type(model))
    if spec is None or found is None:
        return None
    target, index = found
    routers = [m for m in model.modules() if isinstance(m, target)]
    recorder = Recorder(spec, len(routers))
    for module in routers:
        module.register_forward_hook(functools.partial(recorder.hook, index))
    plain = model.forward

    @functools.wraps(plain)
    def forward(*args, **kwargs):
        kwargs["output_router_logits"] = False
        return plain(*args, **kwargs)

    model.forward = forward
    logging.getLogger("loop").info(spec.describe())  # on, its coefficient, and where the coefficient came from
    return recorder


def routing_sums(logits: list[torch.Tensor], token_index: torch.Tensor, top_k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over the real tokens (`token_index`, flat positions) of one micro-batch: per layer and expert the top-k
    assignments (layers, E; no gradient), the router probabilities summed over layers (E; with gradient), and
    per layer the summed entropy of the router's distribution (layers; no gradient)."""
    counts, entropies, probs_sum = [], [], None
    for layer in logits:
        probs = torch.softmax(layer.reshape(-1, layer.shape[-1]).index_select(0, token_index).float(), dim=-1)
        chosen = torch.topk(probs.detach(), top_k, dim=-1).indices.reshape(-1)
        counts.append(torch.zeros(probs.shape[-1], device=probs.device).index_add_(
            0, chosen, torch.ones_like(chosen, dtype=torch.float32)))
        p = probs.detach()
        entropies.append(-(p * p.clamp_min(1e-30).log()).sum())
        probs_sum = probs.sum(0) if probs_sum is None else probs_sum + probs.sum(0)
    return torch.stack(counts), probs_sum, torch.stack(entropies)


@dataclass(frozen=True)
class Routing:
    """One step's routing over every process: the load-balancing loss (without its coefficient), each layer's
    share of the assignments per expert, and each layer's mean router entropy (nats)."""

    aux_loss: float
    shares: list[list[float]]
    entropy: list[float]


class StepBalance:
    """The load-balancing loss of one optimizer step (see the module docstring), built micro-batch by
    micro-batch: `add` returns what that micro-batch's backward adds to its loss; `value` the step's loss from
    the sums over every process."""

    def __init__(self, recorder: Recorder, step_tokens: int, world: int, accumulation: int, reduce, device):
        self.router, self.reduce = recorder.router, reduce
        self.n = max(1, recorder.layers * step_tokens)  # (layer, token) pairs over the whole step
        self.engine_scale = world * accumulation  # the engine divides each backward by this
        e = self.router.experts
        self.counts = torch.zeros(recorder.layers, e, device=device)  # this process's, per layer
        self.seen = torch.zeros(e, device=device)  # every process's, so far this step
        self.probs = torch.zeros(e, device=device)
        self.entropy = torch.zeros(recorder.layers, device=device)

    def add(self, logits: list[torch.Tensor], token_index: torch.Tensor) -> torch.Tensor:
        counts, probs, entropy = routing_sums(logits, token_index, self.router.top_k)
        self.counts += counts
        self.probs += probs.detach()
        self.entropy += entropy
        if not self.router.coef:
            return probs.sum() * 0.0
        self.seen += self.reduce(counts.sum(0))
        pairs_seen = self.seen.sum() / self.router.top_k
        estimate = self.seen * (self.n / pairs_seen.clamp_min(1.0))  # exact at the step's last micro-batch
        weight = self.router.coef * self.router.experts / self.n**2 * self.engine_scale
        return weight * (estimate * probs).sum()

    @property
    def size(self) -> int:
        return self.counts.numel() + self.probs.numel() + self.entropy.numel()

    def sums(self) -> torch.Tensor:
        """What the step's one all-reduce adds up: per layer and expert the assignments, per expert the summed
        probabilities, per layer the summed entropy."""
        return torch.cat([self.counts.flatten(), self.probs, self.entropy])

    def value(self, summed: list[float]) -> Routing:
        """The step's routing, from the reduced `sums()`."""
        layers, e = self.counts.shape
        counts = torch.tensor(summed[: layers * e], dtype=torch.float64).reshape(layers, e)
        probs = torch.tensor(summed[layers * e: layers * e + e], dtype=torch.float64)
        entropy = torch.tensor(summed[layers * e + e:], dtype=torch.float64)
        aux = float(e * (counts.sum(0) / self.n * probs / self.n).sum())
        shares = (counts / counts.sum(1, keepdim=True).clamp_min(1)).tolist()
        return Routing(aux, shares, (entropy / max(self.n / layers, 1)).tolist())
