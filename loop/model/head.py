"""The output projection that computes the loss itself: summed cross-entropy over trained positions, in
chunks, so float32 logits never exist for the whole micro-batch at once.

A micro-batch of 8 x 2048 tokens over StarCoder's 49,152-token vocabulary has 0.8 G logits: 1.6 GB
in bf16, and 3.2 GB more for each float32 copy the plain `cross_entropy(logits.float())` makes for
the loss and its gradient. Here the output projection's forward takes the targets and returns the
summed loss: chunk by chunk it computes logits, their log-sum-exp, and at once the gradients for
the hidden states and the weight (as Liger's fused linear cross-entropy does), so backward only
scales them. It runs inside the projection module's own forward because ZeRO-3 gathers a module's
partitioned weight only while that module runs (and again for its backward); reading
`lm_head.weight` from outside would see an empty shard.

Preference tuning needs each sequence's summed log-probability instead, and its loss depends on those sums
nonlinearly, so a row's gradient is known only after every row is summed: `ChunkedLinearLogProbs`
returns the per-row log-probabilities in chunks and recomputes each chunk's logits in backward (when
ZeRO-3 has gathered the weight again for the module's backward), so that the loss around the sums is
plain autograd.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from loop.data.batches import Batch, model_inputs
from loop.data.packing import IGNORE


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over the rows `index` of hidden of CE(hidden @ weight.T + bias, targets).

    Only rows that have a target are projected at all: about half of a dialogue's tokens (system
    and user turns) need no logits. Their positions come from the host with the batch, so selecting
    them costs no synchronisation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, targets, chunk: int):
        want_grads = any(ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grads else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_grads and bias is not None else None
        for start in range(0, index.shape[0], chunk):
            rows, t = index[start : start + chunk], targets[start : start + chunk]
            h = hidden.index_select(0, rows)
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if want_grads:  # d(sum CE)/d logits = softmax - one_hot(target)
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(t), device=t.device), t] -= 1
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
                grad = grad.to(h.dtype)
                grad_hidden.index_copy_(0, rows, (grad @ weight).to(grad_hidden.dtype))  # bf16 under autocast
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = lambda g, dtype: None if g is None else (g * grad_out).to(dtype)  # noqa: E731
        return (scale(grad_hidden, grad_hidden.dtype), scale(grad_weight, ctx.weight_dtype),
                scale(grad_bias, ctx.weight_dtype), None, None, None)


class ChunkedLinearLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[targets] for the rows `index` of hidden, one float32 value a
    row, chunk by chunk; backward recomputes each chunk's logits (d logp / d logits = one_hot - softmax,
    scaled by each row's incoming gradient). Float32 logits exist for one chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, targets, chunk: int):
        out = torch.empty(index.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        ctx.compute_dtype = hidden.dtype
        for start in range(0, index.shape[0], chunk):
            rows, t = index[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(hidden.index_select(0, rows), weight, bias)
            ctx.compute_dtype = logits.dtype  # bf16 under autocast: backward recomputes the same logits
            logits = logits.float()
            lse[start : start + chunk] = torch.logsumexp(logits, dim=-1)
            out[start : start + chunk] = logits.gather(1, t[:, None])[:, 0] - lse[start : start + chunk]
        ctx.save_for_backward(hidden, weight, bias, index, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, index, targets, lse = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] \
            else None
        dt = ctx.compute_dtype  # autocast is off in backward: cast as it did in forward
        w, b = weight.to(dt), None if bias is None else bias.to(dt)
        for start in range(0, index.shape[0], ctx.chunk):
            rows, t = index[start : start + ctx.chunk], targets[start : start + ctx.chunk]
            h = hidden.index_select(0, rows)
            g = grad_out[start : start + ctx.chunk].float()
            # d(sum g * logp)/d logits = g * (one_hot(target) - softmax)
            grad = F.linear(h.to(dt), w, b).float().sub_(lse[start : start + ctx.chunk, None]).exp_()
            grad.mul_(-g[:, None])
            grad[torch.arange(len(t), device=t.device), t] += g
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            grad = grad.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, rows, (grad @ weight).to(grad_hidden.dtype))
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
        cast = lambda g: None if g is None else g.to(weight.dtype)  # noqa: E731
        return grad_hidden, cast(grad_weight), cast(grad_bias), None, None, None


def install_chunked_head(model, chunk_tokens: int) -> None:
    """Let the output projection compute the summed loss (or the targets' log-probabilities) itself when
    it is given targets.

    Generation and every other call keep the plain projection. chunk_tokens 0 leaves it alone.
    """
    head = model.get_output_embeddings()
    if chunk_tokens <= 0 or type(head) is not torch.nn.Linear or getattr(head, "loss_targets", False) is not False:
        return  # a wrapped projection (peft training it whole) keeps the plain loss
    plain = head.forward
    head.loss_targets = None

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if head.loss_targets is None:
            return plain(hidden)
        function, index, targets = head.loss_targets
        return function.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, index, targets,
                              chunk_tokens)

    head.forward = forward


@contextmanager
def _targets_for_head(model, batch: Batch, function=ChunkedLinearCrossEntropy) -> Iterator[bool]:
    head = getattr(model, "module", model).get_output_embeddings()
    if head is None or not hasattr(head, "loss_targets"):
        yield False
        return
    index = batch["target_index"]
    head.loss_targets = (function, index, batch["targets"].reshape(-1).index_select(0, index))
    try:
        yield True
    finally:
        head.loss_targets = None


def summed_cross_entropy(model, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the trained positions of a device batch (float32 scalar)."""
    with _targets_for_head(model, batch) as chunked:  # use_cache: transformers would fill a KV cache
        out = model(**model_inputs(batch), use_cache=False).logits
    if chunked:
        return out  # the head returned the loss (see install_chunked_head)
    return F.cross_entropy(out.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def target_log_probs(model, batch: Batch) -> torch.Tensor:
    """The log-probability of every target of a device batch, in `target_index` order (float32 vector).
    Without the installed head (chunk 0, a wrapped projection) the logits come whole from the model, and
    only the target rows are taken to float32."""
    with _targets_for_head(model, batch, ChunkedLinearLogProbs) as chunked:
        out = model(**model_inputs(batch), use_cache=False).logits
    if chunked:
        return out
    index = batch["target_index"]
    logits = out.flatten(0, 1).index_select(0, index).float()
    targets = batch["targets"].reshape(-1).index_select(0, index)
    return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
