"""The baseline the loop replaces: a Hugging Face `Trainer` on the loop's workload.

The same model, the same packed rows (the Trainer's sampler shuffles them), the same micro-batch,
bf16 (on a GPU) and the loop's own collate function in the layout a Trainer user has (rows with the
block-diagonal mask, built on the host, and sdpa); the Trainer's own optimizer and data loader defaults. Launched under
`accelerate launch` with a DeepSpeed config it is the Trainer + DeepSpeed ZeRO-3 baseline. Tokens/s
counts the real (non-padding) tokens its collator hands out after the warm-up steps. Prints one
JSON line, with the loss of the first and last logging windows (every --warmup steps) and the peak memory.

With --lora-rank it is the Trainer + peft baseline: LoRA adapters of that rank on the projections the loop
adapts (loop/model/lora.py), with the loop's alpha and dropout; with --qlora the base is loaded in 4-bit NF4
by bitsandbytes with the loop's quantization settings (the usual QLoRA recipe: prepare_model_for_kbit_training).
--checkpointing is the Trainer's gradient checkpointing (non-reentrant, as the loop's).

  accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 1 --module \\
      tools.bench.trainer_baseline MODEL DATA.jsonl --seq-len 2048 --micro-batch 8 --steps 20
  python -m tools.bench.trainer_baseline MODEL DATA.jsonl --seq-len 4096 --micro-batch 4 --checkpointing \\
      --lora-rank 16 --qlora
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

from loop.config import Config, LoraSettings
from loop.data import batches
from loop.data.packing import IGNORE
from loop.model import lora
from loop.report import metrics, profiling
from tools.bench import workload


def main() -> None:
    p = workload.arguments(__doc__, steps=20, warmup=5)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (peft) on a frozen base")
    p.add_argument("--qlora", action="store_true", help="with --lora-rank: the base in 4-bit NF4 (bitsandbytes)")
    p.add_argument("--in-order", action="store_true", help="the rows in the loop's order, not shuffled: in one "
                   "process both sides then train the same micro-batches (within the first epoch)")
    a = p.parse_args()
    tokenizer, columns, rows = workload.load(a.model, a.data, a.seq_len)
    counted = {"tokens": 0, "trained": 0}

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        chosen = [rows[f["row"]] for f in features]
        batch = batches.to_device(batches.collate(columns, chosen, tokenizer.pad_token_id), "cpu")
        counted["tokens"] += workload.real_tokens(chosen)
        counted["trained"] += int((batch["targets"] != IGNORE).sum())
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
                self.start, self.cpu, self.counted = time.perf_counter(), time.process_time(), dict(counted)
            if state.global_step == a.steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                wall, steps = time.perf_counter() - self.start, a.steps - a.warmup
                self.rate = (counted["tokens"] - self.counted["tokens"]) / wall
                self.window = {"trained_tokens_per_s": (counted["trained"] - self.counted["trained"]) / wall,
                               "s_per_step": wall / steps, "cpu_s_per_step": (time.process_time() - self.cpu) / steps}
            self.profiled(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = Clock()
    clock.losses = []
    gpu = torch.cuda.is_available()
    bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION", "bf16" if gpu else "no") == "bf16"  # as launched
    model = load(a, bf16, gpu, len(tokenizer))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=a.micro_batch,
                                 gradient_accumulation_steps=a.accumulation,
                                 **workload.checkpointing(a.checkpointing and not a.qlora),  # QLoRA: in load()
                                 learning_rate=a.lr,
                                 max_steps=a.steps + (4 if a.profile else 0), bf16=bf16, use_cpu=not gpu,
                                 report_to=[], save_strategy="no", logging_steps=a.warmup,
                                 remove_unused_columns=False, disable_tqdm=True,
                                 train_sampling_strategy="sequential" if a.in_order else "random")
        train = datasets.Dataset.from_dict({"row": list(range(len(rows)))})
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[clock])
        with profiling.profiled_steps(a.steps + 2 if a.profile else 0, 3, 0, a.steps + 4, Path(a.profile or "."),
                                      rank=int(os.environ.get("RANK", 0))) as clock.profiled:
            trainer.train()
    if trainer.accelerator.is_main_process:
        print(json.dumps({"tokens_per_s": clock.rate, **clock.window, "peak_bytes": metrics.peak_memory_bytes(),
                          "deepspeed": trainer.is_deepspeed_enabled, "losses": clock.losses,
                          "batch": f"{a.micro_batch} rows" + (f" x {a.accumulation}" if a.accumulation > 1 else "")}))


def fit_vocab(model, vocab: int):
    """Rows for the chat template's tokens where the tokenizer had to add them (a toy vocabulary), as a Trainer
    user resizes after adding tokens and as the loop does."""
    if vocab > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab, pad_to_multiple_of=64)
    return model


def load(a, bf16: bool, gpu: bool, vocab: int):
    """The model as a Trainer user loads it: bf16 (when so launched) with sdpa; with --lora-rank wrapped by peft,
    on a 4-bit base with --qlora."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    if not a.lora_rank:
        return fit_vocab(AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa", dtype=dtype), vocab)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    own = LoraSettings(enabled=True, rank=a.lora_rank, quantize="4bit" if a.qlora else "none")
    quantization = lora.quantization(Config(lora=own))
    model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa", dtype=dtype,
                                                 quantization_config=quantization,
                                                 device_map={"": "cuda" if gpu else "cpu"} if a.qlora else None)
    fit_vocab(model, vocab)
    if a.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif a.checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=own.rank, lora_alpha=own.alpha, lora_dropout=own.dropout,
                                            target_modules=lora.TARGETS[model.config.model_type],
                                            task_type="CAUSAL_LM"))


if __name__ == "__main__":
    main()
