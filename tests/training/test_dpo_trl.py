"""Against a peer: on the same tiny model, pairs, beta, learning rate, optimizer and batch, without packing (one
pair a row), the loop's losses and TRL's metrics over the first steps equal TRL's `DPOTrainer`'s."""

import json
import warnings

import datasets
import pytest
from transformers import AutoTokenizer, TrainerCallback

from loop.data import packing, preference, templates
from tests.conftest import run_in_process, scalars, write_config

STEPS, MICRO, ACCUM = 4, 2, 2
PAIRS = STEPS * MICRO * ACCUM  # one epoch


def test_the_loops_dpo_steps_equal_trls_dpo_trainer(tiny_dir, corpus, tmp_path):
    """TRL is given the pairs as the text the chat template renders (prompt with its generation prompt;
    each answer with its end token, which TRL is told is the end of sequence), so that both tokenize the
    same ids and sum the same completion tokens; and the pairs in the loop's order, read in sequence."""
    trl = pytest.importorskip("trl")
    made = preference.from_dialogues({"all": corpus[:80]}, "other_topic", 3)
    chosen = [preference.recognise(r) for r in made][:PAIRS]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in chosen))
    beta, lr = 0.2, 5e-4
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       model={"attn_implementation": "sdpa"},
                       data={"train_files": [str(path)], "eval_fraction": 0.0, "packing": "pad"},
                       training={"objective": "dpo", "max_steps": STEPS, "micro_batch_size": MICRO,
                                 "gradient_accumulation_steps": ACCUM, "lr": lr, "warmup_steps": 0,
                                 "lr_schedule": "constant", "log_every": 1, "adam_beta2": 0.999,
                                 "fused_optimizer": False},
                       dpo={"beta": beta}, output={"save": False})
    assert run_in_process(cfg) == 0
    ours = scalars(tmp_path / "out")

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    templates.install(tokenizer, "starchat")
    order = packing.epoch_order(PAIRS, 42, 0)  # the loop's row order: one pair a row
    rows = [chosen[k] for k in order]
    text = {"prompt": [templates.render(tokenizer, p["chosen"][:-1], generation_prompt=True) for p in rows],
            "chosen": [p["chosen"][-1]["content"] + "<|end|>" for p in rows],
            "rejected": [p["rejected"][-1]["content"] + "<|end|>" for p in rows]}
    tokenizer.eos_token = "<|end|>"  # TRL appends its EOS to an answer that lacks it: here none does
    logged = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append(logs)

    class InOrder(trl.DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            import torch

            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=MICRO,
                         gradient_accumulation_steps=ACCUM, learning_rate=lr, lr_scheduler_type="constant",
                         warmup_steps=0, max_steps=STEPS, beta=beta, max_length=None, logging_steps=1,
                         report_to=[], save_strategy="no", use_cpu=True, bf16=False, optim="adamw_torch",
                         adam_beta2=0.999, max_grad_norm=1.0, weight_decay=0.0, seed=42, disable_tqdm=True,
                         dataloader_num_workers=0)
    with warnings.catch_warnings():  # the Trainer's own deprecation warnings, not this project's to test
        warnings.simplefilter("ignore", FutureWarning)
        trainer = InOrder(model=str(tiny_dir / "model"), args=args, train_dataset=datasets.Dataset.from_dict(text),
                          processing_class=tokenizer, callbacks=[Record()])
        trainer.train()
    assert len(logged) == STEPS
    for step, theirs in enumerate(logged, start=1):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                     "logps/rejected", "rewards/accuracies"):
            assert dict(ours[f"train/{name}"])[step] == pytest.approx(theirs[name], rel=1e-4, abs=1e-5), (step, name)
    assert logged[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # the policy starts as the reference
    assert min(abs(x["rewards/margins"]) for x in logged[1:]) > 1e-2  # the later steps compare trained models
