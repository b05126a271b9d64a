"""A long row's memory tools (loop/model/memory.py): a tiled MLP gives the loss and gradients of the plain one,
offloaded checkpoints go through the offloader and change nothing, under ZeRO-3 too, and what cannot work is
refused in one line."""

import copy
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loop.config import Config, ConfigError, DataConfig, ModelConfig, validate
from loop.model import memory
from tests.conftest import ROOT


def loss_and_grads(model, ids, offload=None):
    model.train()
    model.zero_grad()
    with memory.offloading(model) if offload is None else offload:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["gpt_bigcode", "qwen2"])
def test_a_tiled_mlp_gives_the_plain_loss_and_gradients(family_dirs, family):
    """3 slices of a 50-token row (uneven: 17, 17, 16), with and without gradient checkpointing: the same loss
    and every gradient as the plain MLP; each block's MLP is tiled (GPTBigCode's c_fc/c_proj, Qwen2's gated one)."""
    plain = AutoModelForCausalLM.from_pretrained(family_dirs(family) / "model", attn_implementation="sdpa")
    ids = torch.randint(0, 200, (2, 50), generator=torch.Generator().manual_seed(0))
    for checkpointing in (False, True):
        tiled = copy.deepcopy(plain)
        if checkpointing:
            tiled.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        memory.apply(tiled, ModelConfig(tiled_mlp=3))
        assert len(memory.mlps(tiled)) == plain.config.num_hidden_layers
        calls = []
        memory.mlps(tiled)[0].register_forward_pre_hook(lambda m, i, calls=calls: calls.append(i[0].shape[1]))
        assert_same(loss_and_grads(tiled, ids), loss_and_grads(plain, ids))
        assert calls == [50] * (1 + checkpointing)  # the MLP is called on the whole row; the slicing is inside


def offload_case(family_dirs, monkeypatch, to_host: bool):
    """The tiny model with checkpointing, offloaded, against the same without offload. `to_host`: DeepSpeed's
    offloader told that this CPU is a device to offload from, so its copy out and back runs here."""
    from deepspeed.runtime.activation_checkpointing import offload_activations

    if to_host:
        monkeypatch.setattr(offload_activations._ActivationOffloadEngine, "_should_skip",
                            lambda self, t: isinstance(t, torch.nn.Parameter))
    plain = AutoModelForCausalLM.from_pretrained(family_dirs("llama") / "model", attn_implementation="sdpa")
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offloaded = copy.deepcopy(plain)
    memory.apply(offloaded, ModelConfig(gradient_checkpointing=True, offload_checkpoints=True))
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    offload = memory.offloading(offloaded)
    assert_same(loss_and_grads(offloaded, ids), loss_and_grads(plain, ids))
    return offload.stats, plain.config.num_hidden_layers


def test_each_checkpointed_layer_input_goes_through_the_offloader(family_dirs, monkeypatch):
    """On CPU the offloader keeps tensors where they are (nothing to offload to), but each layer's checkpointed
    input reaches it, marked as one to move, and the loss and gradients are unchanged."""
    stats, layers = offload_case(family_dirs, monkeypatch, to_host=False)
    assert stats.marked_tensors >= layers and stats.skipped_marked_tensors == layers and stats.offloaded_tensors == 0


def test_offloaded_checkpoints_are_copied_out_and_back_unchanged(family_dirs, monkeypatch):
    """With the offloader's copy path forced on CPU: every layer's input but the newest (its backward comes
    first) is copied out during the forward and back in backward, and the gradients equal those without."""
    stats, layers = offload_case(family_dirs, monkeypatch, to_host=True)
    assert stats.offloaded_tensors == stats.restored_tensors == layers - 1 and stats.kept_last_tensors == 1
    assert stats.offloaded_bytes > 0


def test_what_cannot_work_is_refused_in_one_line(tiny_dir):
    with pytest.raises(ConfigError, match="model.offload_checkpoints: needs model.gradient_checkpointing"):
        validate(Config(model=ModelConfig(offload_checkpoints=True), data=DataConfig(train_files=["x.jsonl"])))
    with pytest.raises(ConfigError, match="model.tiled_mlp: must be >= 0"):
        validate(Config(model=ModelConfig(tiled_mlp=-1), data=DataConfig(train_files=["x.jsonl"])))
    config = AutoConfig.from_pretrained(tiny_dir / "model")
    with pytest.raises(ConfigError, match="model.offload_checkpoints: .* no gradient checkpointing"):
        memory.apply(AutoModelForCausalLM.from_config(config), ModelConfig(offload_checkpoints=True))


@pytest.mark.slow
def test_under_zero3_tiled_mlp_and_offload_keep_the_gradients(family_dirs):
    """Under DeepSpeed ZeRO-3 (one process over gloo, each block gathered whole as the loop gathers it, the
    weights partitioned), the tiled MLP with offloaded checkpoints gives the plain model's loss and full
    gradients, and each checkpointed input is still marked after ZeRO-3's hooks replaced it (DeepSpeed's own
    marker misses it there: tests/model/zero3_memory_probe.py). Its own process, for DeepSpeed's process group:
    about 20 s, in the slow tier."""
    done = subprocess.run([sys.executable, "tests/model/zero3_memory_probe.py", str(family_dirs("qwen2") / "model")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "same loss and gradients" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
