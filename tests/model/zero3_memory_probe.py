"""Under one-process DeepSpeed ZeRO-3 on CPU (gloo), each block gathered whole as loop/engine/deepspeed.py gathers
it: the model with a tiled MLP and offloaded checkpoints (the offloader's copy path forced on, as a GPU takes it)
against the same model plain, both with gradient checkpointing. Prints "same loss and gradients" when the losses
and every full gradient agree and each layer's checkpointed input was offloaded (tests/model/test_memory.py)."""

import os
import sys

import torch

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  DS_ACCELERATOR="cpu")
os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 200))


def engine(folder: str, settings):
    import deepspeed
    from transformers import AutoModelForCausalLM

    from loop.engine.deepspeed import gather_by_block
    from loop.model import memory

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    memory.apply(model, settings)
    gather_by_block(model)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    ds, *_ = deepspeed.initialize(model=model, config=config)
    ds.train()
    return ds


def step(ds, ids):
    from deepspeed.utils import safe_get_full_grad

    from loop.model import memory

    with memory.offloading(ds):
        loss = ds(input_ids=ids, labels=ids).loss
        ds.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in ds.module.named_parameters()}
    return loss.detach(), grads


def main(folder: str) -> int:
    import deepspeed
    from deepspeed.runtime.activation_checkpointing import offload_activations

    from loop.config import ModelConfig
    from loop.model import memory

    offload_activations._ActivationOffloadEngine._should_skip = lambda self, t: isinstance(t, torch.nn.Parameter)
    deepspeed.init_distributed(dist_backend="gloo")
    ids = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(0))
    plain = step(engine(folder, ModelConfig(gradient_checkpointing=True)), ids)
    tiled = engine(folder, ModelConfig(gradient_checkpointing=True, offload_checkpoints=True, tiled_mlp=3))
    got = step(tiled, ids)
    stats = memory.offloading(tiled).stats
    layers = tiled.module.config.num_hidden_layers
    torch.testing.assert_close(got[0], plain[0], rtol=1e-5, atol=1e-6)
    for name, grad in plain[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert stats.offloaded_tensors == stats.restored_tensors == layers - 1, stats
    print(f"same loss and gradients ({len(plain[1])} tensors); {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
