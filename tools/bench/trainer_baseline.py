"""The baseline the loop replaces: a Hugging Face `Trainer` on the loop's workload.

The same model, the same packed rows (the Trainer's sampler shuffles them), the same micro-batch,
bf16 (on a GPU) and the loop's own collate function in the layout a Trainer user has (rows with the
block-diagonal mask, built on the host, and sdpa); the Trainer's own optimizer and data loader defaults. Launched under
`accelerate launch` with a DeepSpeed config it is the Trainer + DeepSpeed ZeRO-3 baseline. Tokens/s
counts the real (non-padding) tokens its collator hands out after the warm-up steps. Prints one
JSON line.

  accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 1 --module \\
      tools.bench.trainer_baseline MODEL DATA.jsonl --seq-len 2048 --micro-batch 8 --steps 20
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from loop.data import batches
from loop.data.packing import IGNORE
from loop.report import profiling
from tools.bench import workload


def main() -> None:
    p = workload.arguments(__doc__, steps=20, warmup=5)
    p.add_argument("--accumulation", type=int, default=1)
    a = p.parse_args()
    tokenizer, columns, rows = workload.load(a.model, a.data, a.seq_len)
    counted = {"tokens": 0}

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        chosen = [rows[f["row"]] for f in features]
        batch = batches.to_device(batches.collate(columns, chosen, tokenizer.pad_token_id), "cpu")
        counted["tokens"] += workload.real_tokens(chosen)
        labels = batch["input_ids"].clone()  # HF convention: the model shifts labels itself
        labels[:, 1:][batch["targets"][:, :-1] == IGNORE] = IGNORE
        labels[:, 0] = IGNORE
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "attention_mask": batch["attention_mask"], "labels": labels}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == a.warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start, self.tokens = time.perf_counter(), counted["tokens"]
            if state.global_step == a.steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.rate = (counted["tokens"] - self.tokens) / (time.perf_counter() - self.start)
            self.profiled(state.global_step)

    clock = Clock()
    gpu = torch.cuda.is_available()
    bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION", "bf16" if gpu else "no") == "bf16"  # as launched
    model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa",
                                                 dtype=torch.bfloat16 if bf16 else torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=a.micro_batch,
                                 gradient_accumulation_steps=a.accumulation, learning_rate=1e-4,
                                 max_steps=a.steps + (4 if a.profile else 0),
                                 bf16=bf16, use_cpu=not gpu, report_to=[], save_strategy="no", logging_steps=10_000,
                                 remove_unused_columns=False, disable_tqdm=True)
        train = datasets.Dataset.from_dict({"row": list(range(len(rows)))})
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[clock])
        with profiling.profiled_steps(a.steps + 2 if a.profile else 0, 3, 0, a.steps + 4, Path(a.profile or "."),
                                      rank=int(os.environ.get("RANK", 0))) as clock.profiled:
            trainer.train()
    peak = torch.cuda.max_memory_allocated() if gpu else 0
    if trainer.accelerator.is_main_process:
        print(json.dumps({"tokens_per_s": clock.rate, "peak_bytes": peak,
                          "deepspeed": trainer.is_deepspeed_enabled}))


if __name__ == "__main__":
    main()
