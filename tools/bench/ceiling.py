"""The ceiling for the loop's throughput: plain PyTorch on one device, nothing else in the way.

No DeepSpeed and no data work in the step: one micro-batch of the loop's workload (the same rows,
flattened in the varlen layout) is copied to the device once and trained on repeatedly, with float32
parameters under bf16 autocast, torch's fused AdamW and the varlen attention kernel (PyTorch's
`varlen_attn` on CUDA, the per-dialogue reference elsewhere). The median of the timed steps after a
warm-up is reported. Prints one JSON line.

  python -m tools.bench.ceiling MODEL DATA.jsonl --seq-len 2048 --micro-batch 8
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loop.data import batches
from loop.data.packing import IGNORE
from loop.model import architecture, attention, flops
from loop.report import metrics, profiling
from tools.bench import workload


def main() -> None:
    a = workload.arguments(__doc__, steps=10, warmup=3).parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer, columns, rows = workload.load(a.model, a.data, a.seq_len)
    chosen = rows[: a.micro_batch]
    batch = batches.to_device(batches.collate(columns, chosen, tokenizer.pad_token_id, layout="varlen"), device)
    impl = "varlen_attn" if attention.torch_varlen_available() else "sdpa_varlen"
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=impl).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    trained = int((batch["targets"] != IGNORE).sum())

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(**batches.model_inputs(batch), use_cache=False).logits  # as the loop: no KV cache
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE,
                               reduction="sum") / trained
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(a.warmup + a.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    with profiling.profiled_steps(2 if a.profile else 0, 3, 0, 4, Path(a.profile or "."), rank=0) as profiled:
        for i in range(1, 5 if a.profile else 0):  # no synchronisation between these steps
            step()
            profiled(i)
    pieces = [e - s for row in chosen for _, s, e in row]
    cost = flops.training_flops(flops.matmul_parameters(model), architecture.Shape.of(model.config), pieces)
    peak = metrics.peak_flops_per_device(0.0)
    print(json.dumps({"attention": impl, "step_s": seconds, "tokens_per_s": sum(pieces) / seconds,
                      "mfu": cost / seconds / peak if peak else None,
                      "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0}))


if __name__ == "__main__":
    main()
