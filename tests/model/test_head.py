"""The loss computed inside the output projection, chunk by chunk: the same sum and gradients as the plain
computation over whole float32 logits, in every precision; plain calls (generation) untouched."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loop.data import packing, templates
from loop.model.head import (
    ChunkedLinearCrossEntropy,
    ChunkedLinearLogProbs,
    install_chunked_head,
    summed_cross_entropy,
    target_log_probs,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradients_equal_the_plain_computation(dtype):
    """The loss computed inside the output projection, chunk by chunk, against cross_entropy over
    the whole float32 logits: the same sum and the same gradients for hidden states, weight and bias."""
    torch.manual_seed(0)
    n, d, vocab = 300, 32, 500
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(d, vocab, bias=True).to(dtype)
    targets = torch.randint(0, vocab, (n,))
    targets[::3] = packing.IGNORE
    plain = F.cross_entropy(head(hidden).float(), targets, ignore_index=packing.IGNORE, reduction="sum")
    plain.backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    index = (targets != packing.IGNORE).nonzero()[:, 0]
    chunked = ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, index, targets[index], 64)
    (chunked * 0.5).backward()  # the incoming gradient scales every stored one
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(chunked, plain, **tol)
    for got, want in zip([hidden.grad, head.weight.grad, head.bias.grad], expected):
        torch.testing.assert_close(got.float(), 0.5 * want.float(), **tol)
    with torch.no_grad():  # evaluation: the same sum, no gradients computed
        evaluated = ChunkedLinearCrossEntropy.apply(hidden, head.weight, None, index, targets[index], 64)
        expected = F.cross_entropy((hidden @ head.weight.T).float(), targets, reduction="sum")
        assert torch.allclose(evaluated, expected, rtol=1e-2)


def test_chunked_loss_under_autocast_equals_the_plain_computation():
    """Mixed precision without DeepSpeed (`accelerate launch --mixed_precision bf16`): float32 weights
    under bf16 autocast, where the projection's matmuls come out in bf16. The chunked loss and its
    gradients equal the plain loss under the same autocast, in the inputs' own dtypes."""
    torch.manual_seed(0)
    n, d, vocab = 200, 32, 300
    hidden = torch.randn(n, d, requires_grad=True)
    head = torch.nn.Linear(d, vocab, bias=True)
    targets = torch.randint(0, vocab, (n,))
    targets[::4] = packing.IGNORE
    index = (targets != packing.IGNORE).nonzero()[:, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(head(hidden).float(), targets, ignore_index=packing.IGNORE, reduction="sum")
    plain.backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, index, targets[index], 64)
    chunked.backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-2)
    for got, want in zip([hidden.grad, head.weight.grad, head.bias.grad], expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_the_installed_head_returns_the_loss_only_when_given_targets(tiny_dir, tokenizer, corpus):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    ids = torch.tensor([templates.encode(tokenizer, corpus[0])[0]])
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), packing.IGNORE)], dim=1)
    logits = model(ids).logits
    install_chunked_head(model, chunk_tokens=7)
    assert torch.equal(model(ids).logits, logits)  # plain calls (generation) are untouched
    batch = {"input_ids": ids, "targets": targets, "target_index": (targets[0] != packing.IGNORE).nonzero()[:, 0]}
    expected = F.cross_entropy(logits[0].float(), targets[0], ignore_index=packing.IGNORE, reduction="sum")
    torch.testing.assert_close(summed_cross_entropy(model, batch), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(model(ids).logits, logits)  # and stay untouched afterwards


def test_training_forward_builds_no_kv_cache(tiny_dir, tokenizer, corpus):
    """transformers fills a KV cache on every forward unless told not to (in training too, without
    gradient checkpointing): a copy of every layer's keys and values that nothing reads."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32).train()
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out))
    ids = torch.tensor([templates.encode(tokenizer, corpus[0])[0]])
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), packing.IGNORE)], dim=1)
    batch = {"input_ids": ids, "targets": targets, "target_index": (targets[0] != packing.IGNORE).nonzero()[:, 0]}
    model(ids)
    assert outputs.pop().past_key_values is not None  # the default this guards against
    for chunk in (0, 7):
        install_chunked_head(model, chunk_tokens=chunk)
        summed_cross_entropy(model, batch).backward()
        assert outputs.pop().past_key_values is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_log_probs_and_their_gradients_through_a_nonlinear_loss_equal_the_plain_computation(dtype):
    """Preference tuning's path: per-target log-probabilities computed in chunks inside the projection, summed
    per sequence, then a loss that is not linear in those sums (DPO's log-sigmoid of a difference): the
    values and the gradients for hidden states, weight and bias equal log_softmax over the whole float32
    logits, in both precisions; backward recomputes each chunk's logits as forward computed them."""
    torch.manual_seed(0)
    n, d, vocab, sequences = 300, 32, 500, 6
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(d, vocab, bias=True).to(dtype)
    index = torch.randperm(n)[:200].sort().values
    targets = torch.randint(0, vocab, (len(index),))
    sequence = torch.randint(0, sequences, (len(index),))
    reference = torch.randn(sequences)

    def loss_of(per_target):
        summed = torch.zeros(sequences).index_add(0, sequence, per_target)
        ratio = summed - reference
        return -torch.nn.functional.logsigmoid(0.1 * (ratio[0::2] - ratio[1::2])).sum()

    plain = head(hidden).float().index_select(0, index).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    loss_of(plain).backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    chunked = ChunkedLinearLogProbs.apply(hidden, head.weight, head.bias, index, targets, 64)
    loss_of(chunked).backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(chunked, plain.detach(), **tol)
    assert chunked.dtype == torch.float32
    for got, want in zip([hidden.grad, head.weight.grad, head.bias.grad], expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)
    assert hidden.grad[torch.ones(n, dtype=torch.bool).index_fill_(0, index, False)].abs().sum() == 0  # no target


def test_chunked_log_probs_under_autocast_recompute_the_logits_forward_saw():
    """float32 weights under bf16 autocast (no DeepSpeed): backward runs outside autocast, and still
    recomputes the bf16 logits forward used, so its softmax is the one the log-probabilities came from."""
    torch.manual_seed(0)
    hidden = torch.randn(120, 32, requires_grad=True)
    head = torch.nn.Linear(32, 300)
    index, targets = torch.arange(0, 120, 2), torch.randint(0, 300, (60,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = head(hidden).float().index_select(0, index).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    (plain * torch.linspace(-1, 1, 60)).sum().backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = ChunkedLinearLogProbs.apply(hidden, head.weight, head.bias, index, targets, 16)
    (chunked * torch.linspace(-1, 1, 60)).sum().backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)  # the same bf16 logits
    for got, want in zip([hidden.grad, head.weight.grad], expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # autocast ran its matmuls in bf16


def test_the_installed_head_gives_each_targets_log_probability(tiny_dir, tokenizer, corpus):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    ids = torch.tensor([templates.encode(tokenizer, corpus[0])[0]])
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), packing.IGNORE)], dim=1)
    index = (targets[0] != packing.IGNORE).nonzero()[:, 0]
    batch = {"input_ids": ids, "targets": targets, "target_index": index}
    expected = model(ids).logits[0].float().log_softmax(-1)[index, targets[0, index]]
    torch.testing.assert_close(target_log_probs(model, batch), expected)  # plain logits (no installed head)
    install_chunked_head(model, chunk_tokens=7)
    torch.testing.assert_close(target_log_probs(model, batch), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(summed_cross_entropy(model, batch), -expected.sum(), rtol=1e-5, atol=1e-4)
