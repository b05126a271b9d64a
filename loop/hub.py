"""Sharing on the Hugging Face Hub: a model card that says how the model was made and how to prompt
it, and uploads that retry and never lose local files.

The token is never read here: `HfApi` takes it from HF_TOKEN or the login cache, so it cannot reach
logs, saved configs or the card.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

log = logging.getLogger("loop")

SNIPPET = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto", device_map="auto")
messages = [{{"role": "user", "content": "Write a Python function that reverses a string."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(model.device)
out = model.generate(**inputs, max_new_tokens=256, do_sample=True, temperature=0.2, top_p=0.95)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def model_card(cfg, summary: dict[str, Any], chat_template: str, example: str) -> ModelCard:
    """A README.md for the model directory, with Hub metadata."""
    repo = cfg.output.hub_model_id or Path(cfg.output.output_dir).name
    datasets = sorted({f.partition(":")[0] for f in cfg.data.train_files if not Path(f).exists()})  # Hub ids
    data = ModelCardData(base_model=cfg.model.name_or_path if not Path(cfg.model.name_or_path).exists() else None,
                         datasets=datasets or None, license=summary.get("license", "other"),
                         tags=["starcoder", "code", "chat", "deepspeed", "zero3"], pipeline_tag="text-generation",
                         library_name="transformers")
    t = cfg.training
    hyper = {"learning rate": t.lr, "schedule": f"{t.lr_schedule}, warm-up {t.warmup_steps or t.warmup_ratio}",
             "optimizer": f"AdamW (betas {t.adam_beta1}, {t.adam_beta2}, eps {t.adam_eps})",
             "weight decay": t.weight_decay,
             "micro-batch per device": t.micro_batch_size, "gradient accumulation": t.gradient_accumulation_steps,
             "processes": summary.get("world_size"), "sequence length": cfg.data.seq_len,
             "packing": cfg.data.packing, "optimizer steps": summary.get("steps"), "max grad norm": t.max_grad_norm,
             "precision": "bf16 (ZeRO-3)", "seed": t.seed}
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyper.items())
    body = f"""---
{data.to_yaml()}
---

# {repo}

A chat model fine-tuned from `{cfg.model.name_or_path}` on multi-turn dialogues with `loop`, a
hand-written Accelerate + DeepSpeed ZeRO-3 training loop. Only assistant turns were trained.

## How to prompt it

The tokenizer carries the chat template the model was trained with (`{cfg.data.template}`); use
`apply_chat_template` and it renders exactly the training format. For example:

```
{example}
```

Generation should stop at the end token; `generation_config.json` sets it as `eos_token_id`.

{SNIPPET.format(repo=repo)}

## Training

| hyperparameter | value |
|---|---|
{rows}

- Tokens trained (assistant tokens with a loss): {summary.get("tokens_trained", 0):,}
  of {summary.get("tokens_seen", 0):,} tokens processed
- Hardware: {summary.get("hardware", "unknown")}
- Final train loss: {summary.get("train_loss", float("nan")):.4f}; final eval loss:
  {summary.get("eval_loss", float("nan")):.4f}
- Data: {", ".join(cfg.data.train_files)} ({cfg.data.format})

<details><summary>Chat template (Jinja)</summary>

```jinja
{chat_template}
```
</details>
"""
    return ModelCard(body)


def upload(folder: Path, repo_id: str, private: bool, revision: str | None = None, message: str = "Upload model",
           retries: int = 4, backoff_s: float = 2.0, api: HfApi | None = None) -> str:
    """create_repo + upload_folder, retried with exponential back-off; returns the commit URL.

    A failure after every retry raises, and the local folder is left as it was.
    """
    api = api or HfApi()
    for attempt in range(1, retries + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                     commit_message=message, repo_type="model")
            log.info(f"uploaded {folder} to {repo_id}" + (f"@{revision}" if revision else ""))
            return str(getattr(info, "commit_url", info))
        except Exception as e:  # noqa: BLE001 - network and Hub errors come in many types
            if attempt == retries:
                raise RuntimeError(f"upload of {folder} to {repo_id} failed after {retries} tries: {e}; "
                                   f"the local files are intact: retry with tools/push_to_hub.py") from e
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning(f"upload of {folder} failed ({type(e).__name__}: {e}); "
                        f"retry {attempt}/{retries - 1} in {wait:.0f}s")
            time.sleep(wait)
    raise AssertionError("unreachable")


class BackgroundUploader:
    """Consolidates and uploads checkpoints on a worker thread, one at a time, so training goes on.

    Each checkpoint's consolidated model goes to its own branch (`step-N`). Failures are logged and
    counted, never raised into the training loop.
    """

    def __init__(self, repo_id: str, private: bool, work_dir: Path, api: HfApi | None = None,
                 backoff_s: float = 2.0):
        self.repo_id, self.private, self.work_dir, self.api = repo_id, private, work_dir, api
        self.backoff_s = backoff_s
        self.jobs: queue.Queue = queue.Queue()
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, checkpoint: Path) -> None:
        from loop.checkpoints import IN_USE

        (checkpoint / IN_USE).touch()
        self.jobs.put(checkpoint)

    def _run(self) -> None:
        from loop import consolidate
        from loop.checkpoints import IN_USE

        while (ckpt := self.jobs.get()) is not None:
            target = self.work_dir / f"upload-{ckpt.name}"
            try:
                try:
                    consolidate.consolidate(ckpt, target)
                finally:
                    (ckpt / IN_USE).unlink(missing_ok=True)
                upload(target, self.repo_id, self.private, revision=ckpt.name.replace("_", "-"),
                       message=f"Checkpoint {ckpt.name}", backoff_s=self.backoff_s, api=self.api)
            except Exception as e:  # noqa: BLE001 - reported, training continues
                self.failures.append(f"{ckpt.name}: {e}")
                log.warning(f"background upload of {ckpt.name} failed: {e}")
            finally:
                shutil.rmtree(target, ignore_errors=True)

    def close(self) -> list[str]:
        """Wait for queued uploads; return the failures."""
        self.jobs.put(None)
        self.thread.join()
        return self.failures
