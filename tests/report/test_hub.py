"""Hub upload and model card against a mocked Hub (the network is the only thing mocked)."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from loop.data import packing
from loop.report import card as model_card
from loop.report import hub
from loop.state import checkpoints, preemption
from tests.conftest import SECRET_TOKEN, poisoned, run_in_process, write_config
from tools import push_to_hub


class FakeHub:
    """Records what would be created and uploaded; the first `fail` uploads raise like a flaky network.
    `during_upload(revision)` runs inside each upload, as the network's latency would."""

    def __init__(self, fail: int = 0, during_upload=None):
        self.fail, self.calls, self.uploaded, self.during_upload = fail, [], {}, during_upload

    def __call__(self, *args, **kwargs):  # used as the HfApi class
        return self

    def create_repo(self, repo_id, private, exist_ok, repo_type):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision, commit_message, repo_type):
        self.calls.append(("upload_folder", repo_id, revision))
        if self.during_upload:
            self.during_upload(revision)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("503 Service Unavailable")
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*")
                 if p.is_file()}
        self.uploaded[(repo_id, revision)] = files
        return f"https://hub.example/{repo_id}/commit/1"


def no_secret_in(files: dict[str, bytes]) -> None:
    leaked = [name for name, body in files.items() if SECRET_TOKEN.encode() in body]
    assert not leaked, f"token written to {leaked}"


def test_upload_retries_then_succeeds(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    fake = FakeHub(fail=2)
    url = hub.upload(tmp_path / "m", "me/model", private=True, backoff_s=0, api=fake)
    assert url.endswith("/commit/1")
    assert [c[0] for c in fake.calls].count("upload_folder") == 3
    assert ("create_repo", "me/model", True) in fake.calls


def test_upload_gives_up_with_local_files_intact(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="after 3 tries.*local files are intact"):
        hub.upload(tmp_path / "m", "me/model", private=True, retries=3, backoff_s=0, api=FakeHub(fail=10))
    assert (tmp_path / "m" / "config.json").read_text() == "{}"


def test_model_card_and_push_tool(trained_run, monkeypatch):
    card = ModelCard.load(trained_run / "final" / "README.md")
    assert card.data.pipeline_tag == "text-generation" and "chat" in card.data.tags
    assert card.data.library_name == "transformers"
    text = card.text
    for needle in ("apply_chat_template", "<|assistant|>", "learning rate", "Tokens trained", "Final train loss",
                   "2 CPU process(es)", "{% generation %}"):
        assert needle in text, needle
    fake = FakeHub()
    monkeypatch.setattr(hub, "HfApi", fake)
    assert push_to_hub.main([str(trained_run), "--repo-id", "me/tiny-chat"]) == 0
    files = fake.uploaded[("me/tiny-chat", None)]
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md",
            "tokenizer_config.json"} <= set(files)  # the chat template is inside, where TGI reads it
    assert ("create_repo", "me/tiny-chat", True) in fake.calls  # private unless asked
    no_secret_in(files)
    no_secret_in({str(p): p.read_bytes() for p in trained_run.rglob("*") if p.is_file()})


def test_checkpoints_upload_in_the_background_to_their_own_branch(trained_run, tmp_path):
    fake = FakeHub(fail=1)
    uploader = hub.BackgroundUploader("me/tiny-chat", True, tmp_path, api=fake, backoff_s=0)
    ckpt = trained_run / "checkpoints" / "step_00000016"
    uploader.submit(ckpt)
    assert uploader.close(wait_s=120) == []  # the first upload failed, the retry succeeded
    files = fake.uploaded[("me/tiny-chat", "step-00000016")]
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert ("create_branch", "me/tiny-chat", "step-00000016") in fake.calls
    assert not (ckpt / ".in_use").exists() and not list(tmp_path.glob("upload-*"))


def test_push_config_requires_a_repo_id(tmp_path):
    from loop import config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_files": ["x"]}, "output": {"push_to_hub": True}}))
    with pytest.raises(config.ConfigError, match="output.hub_model_id"):
        config.from_file(path)


def test_a_run_with_push_to_hub_uploads_final_model_and_checkpoints(tiny_dir, tmp_path, monkeypatch):
    """loop/train.py itself, in this process (one process, no DeepSpeed), against the mocked Hub."""
    fake = FakeHub()
    monkeypatch.setattr(hub, "HfApi", fake)
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"max_steps": 4, "save_every": 2},
                       output={"push_to_hub": True, "hub_model_id": "me/run", "hub_push_checkpoints": True})
    assert run_in_process(cfg) == 0
    final = fake.uploaded[("me/run", None)]
    assert {"model.safetensors", "README.md", "tokenizer.json", "generation_config.json"} <= set(final)
    assert {("me/run", "step-00000002"), ("me/run", "step-00000004")} <= set(fake.uploaded)
    assert "model.safetensors" in fake.uploaded[("me/run", "step-00000002")]
    assert ("create_repo", "me/run", True) in fake.calls
    for files in fake.uploaded.values():
        no_secret_in(files)
    no_secret_in({str(p): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()})
    assert not list((tmp_path / "out" / "checkpoints").glob("*/.in_use"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoints" / "step_00000004")
    assert exported.config.model_type == "gpt_bigcode"  # the plain checkpoint holds config + tokenizer too


def test_model_card_metadata_names_hub_datasets_and_base_model_only(tmp_path):
    from loop import config
    from loop.training import sft

    cfg = config.from_dict({"model": {"name_or_path": "bigcode/starcoderbase"},
                            "data": {"train_files": ["HuggingFaceH4/oasst1_en:train_ift", str(tmp_path)]}})
    card = model_card.model_card(cfg, model_card.RunSummary(world_size=8, hardware="8 x H100", steps=3),
                                 "{{ messages }}", "<|user|>\nhi", "model", tmp_path, sft.card(cfg, {}))
    assert card.data.base_model == "bigcode/starcoderbase"
    assert card.data.datasets == ["HuggingFaceH4/oasst1_en"]  # no split suffix, no local paths


def upload_run(tmp_path, tiny_dir, **training):
    return write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"save_every": 2, **training},
                        output={"push_to_hub": True, "hub_model_id": "me/run", "hub_push_checkpoints": True,
                                "hub_upload_wait_s": 2})


def test_a_preempted_run_finishes_its_checkpoint_uploads_and_unpins_them(tiny_dir, tmp_path, monkeypatch):
    """The scheduler's signal arrives while step 2's checkpoint is uploading: the run saves once more and
    exits 75, and on the way out the uploader finishes every queued upload, the last one included."""

    def preempt_during_first_upload(revision):
        if revision == "step-00000002":
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.5)  # the loop goes on meanwhile and sees the signal at its next step

    fake = FakeHub(during_upload=preempt_during_first_upload)
    monkeypatch.setattr(hub, "HfApi", fake)
    assert run_in_process(upload_run(tmp_path, tiny_dir, max_steps=50)) == preemption.PREEMPTED_EXIT_CODE
    saved = checkpoints.complete_checkpoints(tmp_path / "out" / "checkpoints")
    last = saved[-1].name.replace("_", "-")
    assert last != "step-00000002" and ("me/run", last) in fake.uploaded  # queued at the exit, uploaded before it
    assert not list((tmp_path / "out" / "checkpoints").glob("*/.in_use"))
    assert ("me/run", None) not in fake.uploaded  # no final model: the run did not finish


def test_a_run_that_stops_on_a_non_finite_loss_reports_uploads_it_could_not_finish(tiny_dir, tokenizer, corpus,
                                                                                   tmp_path, monkeypatch):
    """A Hub slower than the bounded wait: the run stops on a NaN loss, says which checkpoints were not
    uploaded, and leaves none of them pinned (so a later run can prune them)."""
    model_dir, _, _ = poisoned(tiny_dir, tokenizer, corpus, tmp_path, n_short=8)
    hub_released = threading.Event()
    fake = FakeHub(during_upload=lambda revision: hub_released.wait(60))
    monkeypatch.setattr(hub, "HfApi", fake)
    seed = next(s for s in range(100) if packing.epoch_order(9, s, 0).index(8) >= 4)  # the long one after step 2
    cfg = upload_run(tmp_path, tiny_dir, max_steps=9, micro_batch_size=1, gradient_accumulation_steps=1, seed=seed)
    try:
        with pytest.raises(FloatingPointError, match="non-finite loss"):
            run_in_process(cfg, "--name_or_path", str(model_dir), "--train_files",
                           f"[{tmp_path / 'train.jsonl'}]", "--packing", "pad", "--eval_fraction", "0")
        said = (tmp_path / "out" / "train.log").read_text()
        assert "step_00000002: not uploaded (still queued or uploading after waiting 2s)" in said
        assert not list((tmp_path / "out" / "checkpoints").glob("*/.in_use"))
    finally:
        hub_released.set()


def test_a_lora_run_uploads_its_merged_model_and_its_adapter(tiny_dir, tmp_path, monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(hub, "HfApi", fake)
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"max_steps": 2, "save_every": 2},
                       output={"push_to_hub": True, "hub_model_id": "me/run"}, lora={"enabled": True})
    assert run_in_process(cfg) == 0
    assert "model.safetensors" in fake.uploaded[("me/run", None)]  # the merged model
    adapter = fake.uploaded[("me/run-adapter", None)]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= set(adapter)
    card = adapter["README.md"].decode()
    assert 'PeftModel.from_pretrained(base, "me/run-adapter")' in card and str(tiny_dir / "model") in card


def test_offline_an_upload_is_refused_at_once_and_a_run_that_would_push_before_it_starts(tiny_dir, tmp_path, capsys):
    """HF_HUB_OFFLINE=1 (set for every test): huggingface_hub would fail each retry; the loop says why, at
    once, and a run that pushes at its end is refused before it trains."""
    import time

    (tmp_path / "m").mkdir()
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set, so nothing can be uploaded"):
        hub.upload(tmp_path / "m", "me/model", private=True)
    assert time.perf_counter() - start < 1
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       output={"push_to_hub": True, "hub_model_id": "me/run"})
    assert run_in_process(cfg, entry="run") == 2
    assert "output.push_to_hub: HF_HUB_OFFLINE is set" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
