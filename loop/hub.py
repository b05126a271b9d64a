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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from loop import checkpoints

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


@dataclass
class RunSummary:
    """What the model card reports about the run; None where it was not measured."""

    world_size: int
    hardware: str
    steps: int = 0
    tokens_trained: int = 0
    tokens_seen: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "not measured"


def model_card(cfg, summary: RunSummary, chat_template: str, example: str) -> ModelCard:
    """A README.md for the model directory, with Hub metadata."""
    repo = cfg.output.hub_model_id or Path(cfg.output.output_dir).name
    datasets = sorted({f.partition(":")[0] for f in cfg.data.train_files if not Path(f).exists()})  # Hub ids
    data = ModelCardData(base_model=cfg.model.name_or_path if not Path(cfg.model.name_or_path).exists() else None,
                         datasets=datasets or None, license=cfg.output.license,
                         tags=["starcoder", "code", "chat", "deepspeed", "zero3"], pipeline_tag="text-generation",
                         library_name="transformers")
    t = cfg.training
    hyper = {"learning rate": t.lr, "schedule": f"{t.lr_schedule}, warm-up {t.warmup_steps or t.warmup_ratio}",
             "optimizer": f"AdamW (betas {t.adam_beta1}, {t.adam_beta2}, eps {t.adam_eps})",
             "weight decay": t.weight_decay,
             "micro-batch per device": t.micro_batch_size, "gradient accumulation": t.gradient_accumulation_steps,
             "processes": summary.world_size, "sequence length": cfg.data.seq_len,
             "packing": cfg.data.packing, "optimizer steps": summary.steps, "max grad norm": t.max_grad_norm,
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

- Tokens trained (assistant tokens with a loss): {summary.tokens_trained:,}
  of {summary.tokens_seen:,} tokens processed
- Hardware: {summary.hardware}
- Final train loss: {_loss(summary.train_loss)}; final eval loss: {_loss(summary.eval_loss)}
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

    Each checkpoint's consolidated model goes to its own branch (`step-N`). A submitted checkpoint is
    pinned (never pruned) until its upload is over or the uploader is closed. Failures are logged and
    counted, never raised into the training loop.
    """

    def __init__(self, repo_id: str, private: bool, work_dir: Path, api: HfApi | None = None,
                 backoff_s: float = 2.0):
        self.repo_id, self.private, self.work_dir, self.api = repo_id, private, work_dir, api
        self.backoff_s = backoff_s
        self.jobs: queue.Queue = queue.Queue()
        self.failures: list[str] = []
        self.pending: list[Path] = []  # submitted, neither uploaded nor failed yet (in order)
        self.lock = threading.Lock()
        self.closed = threading.Event()  # the wait is over: start no further upload
        self.thread = threading.Thread(target=self._run, name="hub-upload", daemon=True)
        self.thread.start()

    def submit(self, checkpoint: Path) -> None:
        checkpoints.pin(checkpoint)
        with self.lock:
            self.pending.append(checkpoint)
        self.jobs.put(checkpoint)

    def _run(self) -> None:
        from loop import export

        while (ckpt := self.jobs.get()) is not None and not self.closed.is_set():
            target = self.work_dir / f"upload-{ckpt.name}"
            try:
                try:
                    export.from_checkpoint(ckpt, target)
                finally:
                    checkpoints.unpin(ckpt)
                upload(target, self.repo_id, self.private, revision=ckpt.name.replace("_", "-"),
                       message=f"Checkpoint {ckpt.name}", backoff_s=self.backoff_s, api=self.api)
            except Exception as e:  # noqa: BLE001 - reported, training continues
                self.failures.append(f"{ckpt.name}: {e}")
                log.warning(f"background upload of {ckpt.name} failed: {e}")
            finally:
                shutil.rmtree(target, ignore_errors=True)
                with self.lock:
                    self.pending.remove(ckpt)

    def close(self, wait_s: float) -> list[str]:
        """Let queued uploads finish for up to `wait_s` seconds; unpin every checkpoint; return what
        went wrong: failed uploads, and checkpoints still queued or uploading when the wait ran out."""
        self.jobs.put(None)
        self.thread.join(wait_s)
        self.closed.set()
        with self.lock:
            unfinished = list(self.pending)
        for ckpt in unfinished:
            checkpoints.unpin(ckpt)
        late = [f"{c.name}: not uploaded (still queued or uploading after waiting {wait_s:.0f}s); "
                f"upload it with tools/push_to_hub.py" for c in unfinished]
        return self.failures + late


@contextmanager
def checkpoint_uploads(out, is_main_process: bool) -> Iterator[BackgroundUploader | None]:
    """A background uploader for the run's checkpoints (None unless `output.hub_push_checkpoints`, and on
    the main process only) that is closed on every way out of the block: normal end, preemption, a
    non-finite stop or any exception; it waits at most `output.hub_upload_wait_s` for queued uploads."""
    enabled = out.push_to_hub and out.hub_push_checkpoints and is_main_process
    uploader = BackgroundUploader(out.hub_model_id, out.hub_private, Path(out.output_dir)) if enabled else None
    try:
        yield uploader
    finally:
        if uploader:
            for problem in uploader.close(out.hub_upload_wait_s):
                log.warning(f"checkpoint upload: {problem}")
