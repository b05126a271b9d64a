"""Sharing on the Hugging Face Hub: uploads that retry and never lose local files, and checkpoint
uploads in the background (the model card is card.py's).

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
from pathlib import Path

from huggingface_hub import HfApi

from loop.state import checkpoints

log = logging.getLogger("loop")


OFFLINE = ("HF_HUB_OFFLINE is set, so nothing can be uploaded (huggingface_hub would retry in vain); unset it, "
           "or set output.push_to_hub: false")


def offline() -> bool:
    """Whether the Hub is switched off here (and the client the real one, not a test's stand-in)."""
    import os

    from huggingface_hub import constants

    real = HfApi.__module__.startswith("huggingface_hub")
    return real and (constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"))


def upload(folder: Path, repo_id: str, private: bool, revision: str | None = None, message: str = "Upload model",
           retries: int = 4, backoff_s: float = 2.0, api: HfApi | None = None) -> str:
    """create_repo + upload_folder, retried with exponential back-off; returns the commit URL.

    A failure after every retry raises, and the local folder is left as it was; offline, it raises at once.
    """
    if api is None and offline():
        raise RuntimeError(OFFLINE)
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
        from loop.state import export

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


def repo_for(hub_model_id: str, kind: str, kinds) -> str:
    """Where each output goes: the model (or merged model) to hub_model_id; an adapter there too when it
    is the only output, else to hub_model_id-adapter."""
    return f"{hub_model_id}-adapter" if kind == "adapter" and len(kinds) > 1 else hub_model_id
