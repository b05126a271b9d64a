"""Ulysses sequence parallelism: each packed row split into `size` consecutive chunks, one a process, with the
attention heads exchanged by all-to-all so that each process attends over the whole row for its share of the
heads.

The processes of a run form groups of `size` consecutive ranks; a group trains the same rows (data
parallelism runs across the groups, loop/data/batches.py gives each process its chunk) and every other layer
(embeddings, MLP, norms, the loss head) works on the process's own tokens as it would on a shorter row. Only
attention needs the whole row: `wrap` turns any attention function of transformers' interface into one that
takes this process's chunk of queries, keys and values for all heads, exchanges them into the whole row for
heads/size of them, runs the attention function unchanged (varlen kernels read the whole row's `cu_seq_lens`,
the "mask" layout the whole row's block mask), and exchanges the output back.

Why not DeepSpeed's `UlyssesSPAttentionHF` (ALST): its wrapper drops a 4-D mask (packed dialogues under SDPA
would see their neighbours), needs `position_ids` passed down to attention (GPTBigCode does not pass them) and
fixes the micro-batch size; the exchange itself is two all-to-alls. DeepSpeed needs nothing else: ZeRO-3
averages gradients over every process and the loss of each token is summed on the process that holds it
(loop/training/step.py), so the gradient is the one of the unsplit row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch's functional all-to-all with autograd (what torchtitan's context parallelism uses; the older
# torch.distributed.nn.functional one is deprecated): backward is the reverse exchange.
from torch.distributed._functional_collectives import all_to_all_single_autograd

from loop.config import ConfigError


@dataclass(frozen=True)
class Split:
    """This process's place: `size` processes share each row, this one is `rank` among them; the rows are
    shared out over `data_size` groups, this process's group being `data_rank`."""

    size: int = 1
    rank: int = 0
    data_size: int = 1
    data_rank: int = 0
    group: object = None  # the torch process group of the `size` processes that share a row


NONE = Split()
_current = NONE  # the run's split, set once by `setup` (attention functions are looked up by name, globally)
_whole = False  # inside `whole_rows`: the model runs on whole sequences (generation), attention is plain


def plan(world: int, rank: int, size: int) -> Split:
    """The split of `world` processes into groups of `size` consecutive ranks (no process group made)."""
    if world % size:
        raise ConfigError(f"parallelism.sequence_parallel_size: {size} does not divide the run's {world} processes")
    return Split(size, rank % size, world // size, rank // size)


def setup(world: int, rank: int, size: int) -> Split:
    """Make the process groups (every process takes part in making each one) and remember this process's."""
    global _current
    split = plan(world, rank, size)
    if size > 1:
        groups = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world // size)]
        split = dataclasses.replace(split, group=groups[split.data_rank])
    _current = split
    return split


def current() -> Split:
    return _current


@contextlib.contextmanager
def whole_rows() -> Iterator[None]:
    """Generation (loop/model/attention.py's for_generation): each process runs its own whole prompts, so
    attention is plain. Everywhere else the model runs on rows the planner split: training, evaluation, the
    reference pass, and the recomputation of checkpointed activations in backward."""
    global _whole
    before, _whole = _whole, True
    try:
        yield
    finally:
        _whole = before


def own_dropout(seed: int) -> None:
    """Seed this process's random stream apart from the others of its group, once the model is built. Every
    process starts from the run's seed, as the weights they build must agree; but the processes of a group run the
    same layers on chunks of one shape, so they would draw the same dropout mask (LoRA's, the model's) for every
    chunk: tokens a chunk apart dropped together, which the unsplit row never does. Nothing random has to agree
    after the model is built (generation draws from its own generator); a resumed run's streams come from its
    checkpoint."""
    if _current.size > 1:
        torch.manual_seed(seed + 1_000_003 * _current.rank)


def check_heads(heads: int, kv_heads: int, size: int) -> str | None:
    """Why the model's heads cannot be shared out over `size` processes, or None."""
    if heads % size:
        return f"the model's {heads} attention heads do not divide by sequence_parallel_size {size}"
    if kv_heads % size and size % kv_heads:
        return (f"the model's {kv_heads} key/value heads and sequence_parallel_size {size}: neither divides the "
                "other")
    return None


def _to_heads(x: torch.Tensor, split: Split) -> torch.Tensor:
    """(batch, heads, chunk, dim) for every head -> (batch, heads / size, row, dim) for this process's heads."""
    b, h, s, d = x.shape
    send = x.reshape(b, split.size, h // split.size, s, d).transpose(0, 1).contiguous()
    got = all_to_all_single_autograd(send, None, None, split.group)  # got[j]: process j's chunk
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // split.size, split.size * s, d)


def _to_chunk(x: torch.Tensor, split: Split) -> torch.Tensor:
    """(batch, row, heads / size, dim) of this process's heads -> (batch, chunk, heads, dim) of every head."""
    b, t, h, d = x.shape
    s = t // split.size
    send = x.reshape(b, split.size, s, h, d).transpose(0, 1).contiguous()
    got = all_to_all_single_autograd(send, None, None, split.group)  # got[j]: process j's heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, s, split.size * h, d)


def wrap(attention: Callable) -> Callable:
    """`attention` (transformers' attention interface) over the whole row, for a process holding a chunk."""

    def ulysses(module, query, key, value, attention_mask, *args, **kwargs):
        split = _current
        if split.size == 1 or _whole:
            return attention(module, query, key, value, attention_mask, *args, **kwargs)
        kv, size = key.shape[1], split.size
        if kv % size:  # fewer key/value heads than processes: each process gets copies of the one its heads use
            key, value = (t.repeat_interleave(size // math.gcd(kv, size), dim=1) for t in (key, value))
        query, key, value = (_to_heads(t, split) for t in (query, key, value))
        groups = getattr(module, "num_key_value_groups", None)  # what transformers' SDPA repeats keys by
        if groups is not None:
            module.num_key_value_groups = query.shape[1] // key.shape[1]
        try:
            out, weights = attention(module, query, key, value, attention_mask, *args, **kwargs)
        finally:
            if groups is not None:
                module.num_key_value_groups = groups
        return _to_chunk(out, split), weights

    ulysses.__wrapped__ = attention
    return ulysses


def install(name: str) -> None:
    """With sequence parallelism, run the attention implementation `name` through `wrap`, for every model
    (transformers looks attention functions up by name; replacing the function, not the name, keeps every
    branch transformers takes on the name, as DeepSpeed's ALST does). Idempotent."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _current.size == 1:
        return
    function = ALL_ATTENTION_FUNCTIONS[name]
    if not hasattr(function, "__wrapped__"):
        ALL_ATTENTION_FUNCTIONS[name] = wrap(function)


def whole_row_sum(partial: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums over the row from each process's part (a pair's log-probabilities): the value is the
    sum over the group, the gradient flows to this process's part only, so the processes' gradients add up to
    the one of the unsplit row."""
    split = _current
    if split.size == 1:
        return partial
    whole = partial.detach().clone()
    dist.all_reduce(whole, group=split.group)
    return partial + (whole - partial).detach()
