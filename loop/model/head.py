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


def install_chunked_head(model, chunk_tokens: int) -> None:
    """Let the output projection compute the summed loss itself when it is given targets.

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
        index, targets = head.loss_targets
        return ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, index,
                                               targets, chunk_tokens)

    head.forward = forward


@contextmanager
def _targets_for_head(model, batch: Batch) -> Iterator[bool]:
    head = getattr(model, "module", model).get_output_embeddings()
    if head is None or not hasattr(head, "loss_targets"):
        yield False
        return
    index = batch["target_index"]
    head.loss_targets = (index, batch["targets"].reshape(-1).index_select(0, index))
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
