"""Training-step benchmark: loop/train.py against a Hugging Face Trainer, one CPU process.

Both train the same tiny model on the same packed rows (best-fit-decreasing, 512 tokens, the same
block-diagonal masks and position ids), with the same micro-batch, accumulation, optimizer and
precision (fp32), for the same number of steps. Throughput is measured after a warm-up window:
ours from its own TensorBoard `throughput/tokens_per_s`, the Trainer's by a callback that counts the
tokens its collator hands out. Trainer-side loss semantics differ (mean per micro-batch); only speed
is compared here.

  python tools/bench/train_step.py [--steps 40] [--micro-batch 4] [--accumulation 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

WARMUP = 10


def ours(work: Path, steps: int, mb: int, ga: int, model: str, data_file: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = {"model": {"name_or_path": model}, "data": {"train_files": [data_file], "seq_len": 512},
           "training": {"max_steps": steps, "micro_batch_size": mb, "gradient_accumulation_steps": ga, "lr": 1e-3,
                        "log_every": WARMUP, "save_every": 10_000},
           "output": {"output_dir": str(work / "ours")}}
    (work / "ours.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    subprocess.run([sys.executable, str(ROOT / "loop" / "train.py"), str(work / "ours.yaml")], check=True,
                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acc = EventAccumulator(str(work / "ours" / "tensorboard"))
    acc.Reload()
    windows = [e.value for e in acc.Scalars("throughput/tokens_per_s")][1:]  # skip the warm-up window
    return sum(windows) / len(windows)


def trainer(steps: int, mb: int, ga: int, model_dir: str, data_file: str) -> float:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from loop import data, packing, templates

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    templates.install(tokenizer, "starchat")
    dialogues, _ = data.load_dialogues([data_file], "messages", "error")
    ds = data.tokenize(dialogues, tokenizer, 512, "truncate")
    ids, masks = ds["input_ids"], ds["assistant_mask"]
    rows = packing.plan_rows([len(x) for x in ids], 512, "bfd")
    counted = {"tokens": 0}

    def collate(features):
        batch = packing.collate([rows[f["row"]] for f in features], ids, masks, tokenizer.pad_token_id)
        counted["tokens"] += sum(e - s for f in features for _, s, e in rows[f["row"]])
        labels = batch["input_ids"].clone()  # HF convention: the model shifts labels itself
        labels[:, 1:][batch["targets"][:, :-1] == packing.IGNORE] = packing.IGNORE
        labels[:, 0] = packing.IGNORE
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                "attention_mask": batch["attention_mask"], "labels": labels}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP:
                self.start, self.tokens = time.perf_counter(), counted["tokens"]
            if state.global_step == steps:
                self.rate = (counted["tokens"] - self.tokens) / (time.perf_counter() - self.start)

    clock = Clock()
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=mb, gradient_accumulation_steps=ga,
                                 max_steps=steps, learning_rate=1e-3, use_cpu=True, report_to=[],
                                 save_strategy="no", logging_steps=WARMUP, remove_unused_columns=False,
                                 dataloader_num_workers=0, disable_tqdm=True)
        train = datasets.Dataset.from_dict({"row": list(range(len(rows)))})
        Trainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[clock]).train()
    return clock.rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--model", default=str(ROOT / "artifacts" / "tiny-starcoder"))
    p.add_argument("--data", default=str(ROOT / "artifacts" / "data" / "chatterbot.jsonl"))
    p.add_argument("--only", choices=["trainer"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only == "trainer":  # run in its own process, like ours
        print(json.dumps(trainer(a.steps, a.micro_batch, a.accumulation, a.model, a.data)))
        return
    with tempfile.TemporaryDirectory() as work:
        ours_rate = ours(Path(work), a.steps, a.micro_batch, a.accumulation, a.model, a.data)
    out = subprocess.run([sys.executable, __file__, "--only", "trainer", "--steps", str(a.steps),
                          "--micro-batch", str(a.micro_batch), "--accumulation", str(a.accumulation),
                          "--model", a.model, "--data", a.data], check=True, capture_output=True, text=True)
    trainer_rate = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"tiny GPTBigCode, 512-token packed rows, micro-batch {a.micro_batch} x {a.accumulation} accumulation, "
          f"{a.steps} steps (first {WARMUP} are warm-up), 1 CPU process, fp32")
    print(f"{'run':28s} {'tokens/s':>10s} {'ratio':>7s}")
    print(f"{'HF Trainer':28s} {trainer_rate:10,.0f} {1.0:7.2f}")
    print(f"{'loop/train.py':28s} {ours_rate:10,.0f} {ours_rate / trainer_rate:7.2f}")


if __name__ == "__main__":
    main()
