"""What a model costs: its parameters (also when ZeRO-3 partitions them or they are packed in 4 bits) and the
FLOPs of training on packed dialogues, for MFU."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from loop.model.architecture import Shape


def _numel(p: torch.Tensor) -> int:
    """Logical elements: 4-bit packed weights keep theirs in their quant state, ZeRO-3 partitions in ds_numel."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return int(torch.Size(state.shape).numel())
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, also under ZeRO-3 and with a 4-bit base."""
    params = list(model.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def matmul_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    """The parameters that take part in matrix multiplies (only the trainable ones, if asked): all but
    embedding lookups (token and learned position embeddings), except a token embedding that is also
    the output projection (tied)."""
    output = model.get_output_embeddings()
    tied = getattr(output, "weight", None)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not tied}
    return sum(_numel(p) for p in model.parameters()
               if id(p) not in lookups and (p.requires_grad or not trainable))


def attention_pairs(n: np.ndarray, window: int | None) -> np.ndarray:
    """Query-key pairs causal attention computes in a dialogue of n tokens (each query sees at most
    `window` keys, itself included)."""
    if window is None:
        return n * (n + 1) // 2
    w = np.minimum(n, window)
    return w * (w + 1) // 2 + (n - w) * w


def training_flops(matmul_params: int, shape, piece_lengths: list[int], trainable_matmul_params: int | None = None
                   ) -> float:
    """FLOPs of forward + backward over these pieces (packed dialogues).

    Per token, 2 per matmul parameter forward (embedding lookups are no matmuls), 2 backward for the
    gradient of the activations (every layer passes it on), and 2 for the gradient of the weights,
    which only trainable weights get: 6N when everything trains, 4N + 2N_trainable with a frozen base
    (LoRA), so MFU does not count work that is not done. Plus attention: QK^T and AV cost 2 * head_dim
    FLOPs each per query head per query-key pair forward, times 3 for forward + backward (it has no
    weights); key/value heads shared by several query heads save memory, not these FLOPs. Packing
    matters: pairs follow each dialogue's own length (and sliding window).
    """
    n = np.asarray(piece_lengths, dtype=np.int64)
    trainable = matmul_params if trainable_matmul_params is None else trainable_matmul_params
    pairs = sum(int(attention_pairs(n, w).sum()) for w in shape.windows)
    return (4.0 * matmul_params + 2.0 * trainable) * int(n.sum()) + 12.0 * shape.q_heads * shape.head_dim * pairs


def counter(model: torch.nn.Module, shape: Shape) -> Callable[[list[int]], float]:
    """The FLOPs of a step of this model as a function of its dialogues' lengths (a frozen base counted as
    such)."""
    everything, trainable = matmul_parameters(model), matmul_parameters(model, trainable=True)
    return lambda piece_lengths: training_flops(everything, shape, piece_lengths, trainable)
