"""Hub upload and model card against a mocked Hub (the network is the only thing mocked)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, pipeline

from loop import hub
from tests.conftest import ROOT, SECRET_TOKEN
from tools import push_to_hub


class FakeHub:
    """Records what would be created and uploaded; the first `fail` uploads raise like a flaky network."""

    def __init__(self, fail: int = 0):
        self.fail, self.calls, self.uploaded = fail, [], {}

    def __call__(self, *args, **kwargs):  # used as the HfApi class
        return self

    def create_repo(self, repo_id, private, exist_ok, repo_type):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision, commit_message, repo_type):
        self.calls.append(("upload_folder", repo_id, revision))
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
            "chat_template.jinja"} <= set(files)
    assert ("create_repo", "me/tiny-chat", True) in fake.calls  # private unless asked
    no_secret_in(files)
    no_secret_in({str(p): p.read_bytes() for p in trained_run.rglob("*") if p.is_file()})


def test_checkpoints_upload_in_the_background_to_their_own_branch(trained_run, tmp_path):
    fake = FakeHub(fail=1)
    uploader = hub.BackgroundUploader("me/tiny-chat", True, tmp_path, api=fake, backoff_s=0)
    ckpt = trained_run / "checkpoints" / "step_00000016"
    uploader.submit(ckpt)
    assert uploader.close() == []  # the first upload failed, the retry succeeded
    files = fake.uploaded[("me/tiny-chat", "step-00000016")]
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert ("create_branch", "me/tiny-chat", "step-00000016") in fake.calls
    assert not (ckpt / ".in_use").exists() and not list(tmp_path.glob("upload-*"))


def test_push_config_requires_a_repo_id(tmp_path):
    from loop import config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_files": ["x"]}, "output": {"push_to_hub": True}}))
    with pytest.raises(config.ConfigError, match="output.hub_model_id"):
        config.load(path)


def test_generate_tool_batch_and_checkpoint(trained_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is Python?\nWrite a loop in C.\n")
    for source in (trained_run / "final", trained_run / "checkpoints" / "step_00000016"):
        out = tmp_path / f"{source.name}.md"
        proc = subprocess.run([sys.executable, "tools/generate.py", str(source), "--prompts-file", str(prompts),
                               "--out", str(out), "--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "20"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        text = out.read_text()
        assert "## What is Python?" in text and "## Write a loop in C." in text and "<|end|>" not in text


def test_generate_tool_chat_through_a_pipe(trained_run):
    proc = subprocess.run([sys.executable, "tools/generate.py", str(trained_run / "final"), "--chat",
                           "--max-new-tokens", "6", "--temperature", "0"],
                          input="Hello\n/reset\nDo you know Python?\n\n", cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("user> ") == 4 and proc.stdout.count("assistant> ") == 2
    assert "<|end|>" not in proc.stdout


def test_transformers_pipeline_chats_and_stops_at_the_end_token(trained_run):
    chat = pipeline("text-generation", model=str(trained_run / "final"))
    messages = [{"role": "user", "content": "Hello"}]
    out = chat(messages, max_new_tokens=40, min_new_tokens=2, do_sample=False)[0]["generated_text"]
    assert out[:-1] == messages and out[-1]["role"] == "assistant"
    answer = out[-1]["content"]
    assert answer.strip() and "<|end|>" not in answer and "<|user|>" not in answer
    ids = chat.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
    new = chat.model.generate(**ids, max_new_tokens=40, min_new_tokens=2, do_sample=False)
    new = new[0, ids["input_ids"].shape[1]:]
    assert new[-1].item() == chat.tokenizer.convert_tokens_to_ids("<|end|>") and len(new) < 40  # it stopped there


def test_a_run_with_push_to_hub_uploads_final_model_and_checkpoints(tiny_dir, tmp_path, monkeypatch):
    """loop/train.py itself, in this process (one process, no DeepSpeed), against the mocked Hub."""
    import signal

    from accelerate.state import AcceleratorState

    from loop import train
    from tests.conftest import write_config

    fake = FakeHub()
    monkeypatch.setattr(hub, "HfApi", fake)
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"max_steps": 4, "save_every": 2},
                       output={"push_to_hub": True, "hub_model_id": "me/run", "hub_push_checkpoints": True})
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert train.main([str(cfg)]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        AcceleratorState._reset_state(reset_partial_state=True)
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
    from loop.config import Config, DataConfig, ModelConfig

    cfg = Config(model=ModelConfig(name_or_path="bigcode/starcoderbase"),
                 data=DataConfig(train_files=["HuggingFaceH4/oasst1_en:train_ift", str(tmp_path)]))
    card = hub.model_card(cfg, {"steps": 3, "world_size": 8}, "{{ messages }}", "<|user|>\nhi")
    assert card.data.base_model == "bigcode/starcoderbase"
    assert card.data.datasets == ["HuggingFaceH4/oasst1_en"]  # no split suffix, no local paths
