"""Estimate the memory a ZeRO-3 (or, --engine fsdp2, FSDP2) run needs per GPU and per node, before launching it.

Counts parameters from the model's config alone (no weights are downloaded or allocated), then
adds the engine's estimate of model states (DeepSpeed's own for ZeRO-3) to an estimate of activations and
logits for the given micro-batch and sequence length. MODEL is a Hub id, a model folder, or a config.json file (for a
model that is gated or out of reach, e.g. configs/models/*.json).

  python tools/estimate_memory.py bigcode/starcoderbase --gpus-per-node 8 --micro-batch 4 --seq-len 1024 --checkpointing
  python tools/estimate_memory.py configs/models/starcoder2-15b.json --gpus-per-node 8 --seq-len 4096 --checkpointing
  python tools/estimate_memory.py artifacts/tiny-starcoder --gpus-per-node 2
  python tools/estimate_memory.py configs/models/starcoder2-15b.json --engine fsdp2 --seq-len 4096 --checkpointing
  python tools/estimate_memory.py configs/models/qwen2.5-coder-7b.json --gpus-per-node 8 --micro-batch 1 \
      --seq-len 131072 --checkpointing --offload-checkpoints --tiled-mlp 8 --sequence-parallel 8

Long rows (32k-128k tokens): --sequence-parallel N splits each row over N GPUs (each holds 1/N of every
activation, plus the attention's all-to-all buffers), --offload-checkpoints keeps the checkpointed layer inputs in
CPU memory (counted in the CPU column), --tiled-mlp K computes the MLP in K slices (model.tiled_mlp).
"""

from __future__ import annotations

import argparse
import sys

from loop.engine import registry
from loop.model import estimate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="Hub id, model folder or config.json (only the config is read)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="GPUs sharing each row (parallelism.sequence_parallel_size)")
    p.add_argument("--offload-checkpoints", action="store_true",
                   help="with --checkpointing: layer inputs kept in CPU memory (model.offload_checkpoints)")
    p.add_argument("--tiled-mlp", type=int, default=0, metavar="K", help="the MLP in K slices (model.tiled_mlp)")
    p.add_argument("--lora-rank", type=int, default=0, help="estimate a LoRA run with adapters of this rank")
    p.add_argument("--qlora", action="store_true", help="with --lora-rank: the frozen base in 4-bit (QLoRA)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--engine", choices=list(registry.ENGINES), default=registry.DEFAULT,
                   help="how the run shares the model states (the accelerate config it launches with)")
    a = p.parse_args(argv)
    if a.sequence_parallel < 1 or a.tiled_mlp < 0 or a.seq_len < 1:
        p.error("--sequence-parallel and --seq-len must be >= 1, --tiled-mlp >= 0")
    if a.offload_checkpoints and not a.checkpointing:
        p.error("--offload-checkpoints needs --checkpointing (it moves the checkpoints that keeps)")
    if a.gpus_per_node * a.nodes % a.sequence_parallel:
        p.error(f"--sequence-parallel {a.sequence_parallel} must divide the {a.gpus_per_node * a.nodes} GPUs")
    long = estimate.Long(a.sequence_parallel, a.offload_checkpoints, a.tiled_mlp)
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # an unreachable Hub is said once below, not once per retry
    try:
        head, *rows = estimate.estimate(a.model, a.gpus_per_node, a.nodes, a.micro_batch, a.seq_len,
                                        a.checkpointing, a.trust_remote_code, a.lora_rank, a.qlora, a.engine, long)
    except estimate.EstimateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.model}: {head['params'] / 1e9:.3f}B parameters (largest layer {head['largest_layer'] / 1e6:.1f}M); "
          f"{a.nodes} node(s) x {a.gpus_per_node} GPU(s), {registry.get(a.engine).title}; "
          f"micro-batch {a.micro_batch} x {a.seq_len} tokens, "
          f"checkpointing {'on' if a.checkpointing else 'off'}"
          + (", offloaded to CPU" if a.offload_checkpoints else "")
          + (f", MLP in {a.tiled_mlp} slices" if a.tiled_mlp else "")
          + (f", each row over {a.sequence_parallel} GPUs" if a.sequence_parallel > 1 else "")
          + f": activations + logits {head['activations_gb']:.2f} GB/GPU"
          + (f"; LoRA rank {a.lora_rank}: {head['adapter'] / 1e6:.1f}M trainable parameters" if a.lora_rank else ""))
    parts = head["parts"]
    print(f"  per GPU: activations {parts['activations']:.2f} GB, loss head {parts['logits']:.2f} GB, all-to-all "
          f"{parts['all_to_all']:.2f} GB; offloaded to CPU {parts['host']:.2f} GB")
    print(f"{'setting':36s} {'peak GB/GPU':>11s} {'(model states)':>15s} {'CPU GB/node':>12s}")
    for r in rows:
        print(f"{r['setting']:36s} {r['gpu_gb']:11.2f} {r['model_states_gpu_gb']:15.2f} {r['cpu_gb_per_node']:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
