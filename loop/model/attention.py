"""Attention for packed rows: which implementations keep packed dialogues apart, and how.

Two layouts keep a packed dialogue from seeing its neighbours:
- "mask": rows of the micro-batch with a block-diagonal causal mask, built on the device from
  per-token sequence ids (`sdpa`).
- "varlen": the micro-batch flattened into one row, with cumulative sequence lengths
  (`cu_seq_lens_q/k`, `max_length_q/k`) passed through the model to the attention function, as
  flash-attention's varlen kernel takes them. No mask and no padding at all.
Position ids alone do not separate dialogues (GPTBigCode does not even pass them to attention), and
`eager` ignores a boolean 4-D mask, so it can only train one dialogue per row (`data.packing: pad`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Iterator
from typing import get_args

import torch

from loop.config import ATTENTION_LAYOUT, Attention, Layout
from loop.model import sequence_parallel

assert set(ATTENTION_LAYOUT) | {"auto", "eager"} == set(get_args(Attention))


def layout(attn_implementation: str, packing: str) -> Layout:
    """The batch layout for a resolved implementation. "concat" (one stream, no boundaries) and eager
    always take plain rows: with nothing to keep apart, the mask is just causal."""
    return ATTENTION_LAYOUT.get(attn_implementation, "mask") if packing != "concat" else "mask"


def torch_varlen_available() -> bool:
    """PyTorch's own flash varlen kernel (torch >= 2.10), CUDA only."""
    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None


def fast_choices() -> list[str]:
    """The fast packed-attention choices whose kernel and package exist here (for benchmarks)."""
    found = ["sdpa"]
    if torch_varlen_available():
        found.append("varlen_attn")
    for name, package in (("flash_attention_2", "flash_attn"), ("flash_attention_3", "flash_attn_interface")):
        if torch.cuda.is_available() and importlib.util.find_spec(package) is not None:
            found.append(name)
    return found


def resolve(requested: str, attention_dropout: float = 0.0) -> tuple[str, str | None]:
    """The implementation to use and, when it differs from the request, why.

    "auto" takes the fastest that keeps dialogues apart: flash-attention's varlen kernel when CUDA and
    flash_attn are there, else torch's `varlen_attn` (no extra package, but no attention dropout),
    else on CUDA SDPA with block-diagonal masks. Without CUDA, SDPA per dialogue (`sdpa_varlen`): a masked
    row computes every pair of its tokens, a dialogue only its own, so on CPU it is the faster of the two
    (tools/bench/train_step.py), at a Python call per dialogue that a GPU would wait on.
    """
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if flash:
            return "flash_attention_2", None
        if torch_varlen_available() and attention_dropout == 0:
            return "varlen_attn", None
        return ("sdpa" if torch.cuda.is_available() else "sdpa_varlen"), None
    if requested.startswith("flash_attention"):
        package = "flash_attn_interface" if requested.endswith("3") else "flash_attn"
        if not torch.cuda.is_available() or importlib.util.find_spec(package) is None:
            return "sdpa", (f"{requested} needs a CUDA GPU and the {package} package; "
                            "falling back to sdpa with block-diagonal masks")
    if requested == "varlen_attn":
        if not torch_varlen_available():
            return "sdpa_varlen", ("varlen_attn is PyTorch's CUDA kernel (torch >= 2.10); falling back to "
                                   "sdpa_varlen, the same flattened layout computed per dialogue")
        if attention_dropout > 0:
            return "sdpa", (f"varlen_attn has no attention dropout and the model sets {attention_dropout}; "
                            "falling back to sdpa (set the model's attention dropout to 0 to use varlen_attn)")
    return requested, None


def attention_dropout(model_config) -> float:
    """The model's attention dropout, under its config's name for it."""
    for name in ("attention_dropout", "attn_pdrop"):
        if isinstance(getattr(model_config, name, None), (int, float)):
            return float(getattr(model_config, name))
    return 0.0


def _expand_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query / multi-query attention: repeat each key/value head for its query heads."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def sdpa_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                **kwargs):
    """Varlen attention on any device: causal SDPA per packed sequence, from cu_seq_lens_q.

    Takes exactly what flash-attention's varlen path takes (query/key/value as (1, heads, T, dim)), so
    the flattened layout is checked on any device; `auto` on CPU, where computing each dialogue's own
    block beats a masked row. A Python call per dialogue: on a GPU, slower than the varlen kernels.
    """
    cu = kwargs["cu_seq_lens_q"].tolist()
    key, value = _expand_kv(query, key, value)
    out = torch.empty_like(query)
    for start, end in zip(cu[:-1], cu[1:]):
        n = end - start
        mask = None
        if sliding_window is not None and n > sliding_window:
            i = torch.arange(n, device=query.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
        out[:, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=mask,
            dropout_p=dropout if module.training else 0.0, is_causal=mask is None, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _varlen_kernel() -> tuple:
    """torch's varlen_attn and whether it takes enable_gqa (2.13 does; 2.11 does not)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def torch_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                 **kwargs):
    """PyTorch's flash varlen kernel on the flattened layout. Causal is `window_size=(-1, 0)` in every
    version seen; a sliding window of W tokens is (W - 1, 0), as transformers gives flash-attention."""
    kernel, takes_gqa = _varlen_kernel()
    if dropout and module.training:
        raise ValueError("varlen_attn has no attention dropout; use sdpa or flash_attention_2")
    q = query[0].transpose(0, 1)  # (T, heads, dim)
    if takes_gqa:
        k, v, gqa = key[0].transpose(0, 1), value[0].transpose(0, 1), key.shape[1] != query.shape[1]
    else:
        k, v = (t[0].transpose(0, 1) for t in _expand_kv(query, key, value))
        gqa = False
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    extra = {"enable_gqa": gqa} if takes_gqa else {}
    out = kernel(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=window, **extra)
    return out.unsqueeze(0), None  # (1, T, heads, dim)


@contextlib.contextmanager
def for_generation(model) -> Iterator[None]:
    """Generation pads a batch and keeps a KV cache, which the varlen functions (one flattened row of whole
    sequences, cu_seq_lens) do not take: it runs on SDPA, and the training choice comes back after. Each
    process generates for its own prompts: with sequence parallelism, attention does not exchange heads."""
    chosen = model.config._attn_implementation
    if ATTENTION_LAYOUT.get(chosen) != "varlen":
        with sequence_parallel.whole_rows():
            yield
        return
    model.set_attn_implementation("sdpa")
    try:
        with sequence_parallel.whole_rows():
            yield
    finally:
        model.set_attn_implementation(chosen)


def register() -> None:
    """Make the two varlen functions known to transformers by name (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa_varlen", sdpa_varlen)
    AttentionInterface.register("varlen_attn", torch_varlen)
