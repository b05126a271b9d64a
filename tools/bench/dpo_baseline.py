"""The preference-tuning baseline: TRL's `DPOTrainer` on the loop's preference pairs.

The same model and pairs (a JSONL of preference records, as loop/train.py reads them), rendered by the same
chat template into the text TRL tokenizes (the prompt with its generation prompt, each answer with its end
token, which TRL is told ends a sequence), so both sum the same completion tokens. TRL's own defaults
otherwise: a reference model kept in memory and run at every step (or, with --precompute, its
log-probabilities computed before training), padded batches. Tokens/s counts the real (non-padding) tokens
its collator hands out after the warm-up steps, as the loop counts its own. Prints one JSON line, with the
loss of the first and last logging windows (every --warmup steps) and the peak memory. Launched under
`accelerate launch` with a DeepSpeed config it trains under DeepSpeed, in the launch's precision.

TRL's `padding_free` would be its fastest setting, but TRL 1.16 turns it off with a warning ("temporarily
unavailable" since its DPO refactor), so it is not offered here: the precomputed reference is its fastest.

  python -m tools.bench.dpo_baseline MODEL PAIRS.jsonl --micro-batch 8 --accumulation 2 --steps 30 [--precompute]
  accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 1 --module \\
      tools.bench.dpo_baseline MODEL PAIRS.jsonl --micro-batch 100 --precompute --checkpointing
"""

from __future__ import annotations

import json
import os
import time
import warnings

import datasets
import torch
from transformers import AutoTokenizer, TrainerCallback

from loop.data import preference, templates
from loop.report import metrics
from tools.bench import workload


def texts(tokenizer, path: str) -> dict[str, list[str]]:
    """TRL's plain-text records of the pairs in a file, rendered as the loop renders them."""
    pairs = [preference.recognise(json.loads(line)) for line in open(path)]
    end = templates.STARCHAT.end_token
    return {"prompt": [templates.render(tokenizer, p["chosen"][:-1], generation_prompt=True) for p in pairs],
            "chosen": [p["chosen"][-1]["content"] + end for p in pairs],
            "rejected": [p["rejected"][-1]["content"] + end for p in pairs]}


def main() -> None:
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    p = workload.arguments(__doc__, steps=30, warmup=5)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--precompute", action="store_true", help="TRL's precompute_ref_log_probs")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    a = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    templates.install(tokenizer, "starchat")
    data = datasets.Dataset.from_dict(texts(tokenizer, a.data))
    tokenizer.eos_token = templates.STARCHAT.end_token  # TRL appends its EOS to an answer that lacks it
    counted = {"tokens": 0}
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)

    def counting(examples):
        batch = collate(examples)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (a.warmup, a.steps) and torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step == a.warmup:
                self.start, self.tokens = time.perf_counter(), counted["tokens"]
            if state.global_step == a.steps:
                self.rate = (counted["tokens"] - self.tokens) / (time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = Clock()
    clock.losses = []
    gpu = torch.cuda.is_available()
    bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION", "bf16" if gpu else "no") == "bf16"  # as launched
    args = DPOConfig(output_dir="/tmp/dpo-baseline", per_device_train_batch_size=a.micro_batch,
                     gradient_accumulation_steps=a.accumulation, learning_rate=a.lr, max_steps=a.steps,
                     beta=a.beta, max_length=None, precompute_ref_log_probs=a.precompute, bf16=bf16, use_cpu=not gpu,
                     **workload.checkpointing(a.checkpointing),
                     report_to=[], save_strategy="no", logging_steps=a.warmup, disable_tqdm=True,
                     dataloader_num_workers=0, model_init_kwargs={"attn_implementation": "sdpa",
                                                                  "dtype": torch.bfloat16 if bf16 else torch.float32})
    with warnings.catch_warnings():  # the Trainer's deprecation notes, once per run
        warnings.simplefilter("ignore", FutureWarning)
        trainer = DPOTrainer(model=a.model, args=args, train_dataset=data, processing_class=tokenizer,
                             data_collator=counting, callbacks=[clock])
        trainer.train()
    if trainer.accelerator.is_main_process:
        print(json.dumps({"tokens_per_s": clock.rate, "peak_bytes": metrics.peak_memory_bytes(),
                          "precompute": a.precompute, "deepspeed": trainer.is_deepspeed_enabled,
                          "losses": clock.losses, "batch": f"{a.micro_batch} pairs x {a.accumulation}"}))


if __name__ == "__main__":
    main()
