"""The model card: its snippet loads what was saved and chats with it; its metadata and plot are there."""

from huggingface_hub import ModelCard

from tests.conftest import run_card_snippets


def test_the_cards_snippet_loads_the_saved_folder_and_answers(trained_run, tiny_dir):
    final = trained_run / "final"
    card = ModelCard.load(final / "README.md")
    assert f'from_pretrained("{final.resolve()}"' in card.text  # not pushed, and not under the cwd: the full path
    assert card.text.strip().splitlines()[0] == f"# {trained_run.name}"  # the run's name, not "final"
    # A local base without a card of its own has no Hub id: no base_model, no license made up, its path said.
    assert card.data.base_model is None and card.data.license is None
    assert f"fine-tuned from `{tiny_dir / 'model'}`" in card.text and "bf16 training, saved as bf16" in card.text
    assert (final / "eval_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![eval loss](eval_loss.png)" in card.text
    assert int(run_card_snippets(final).split("new tokens:")[1]) >= 1  # the chat snippet generated an answer


def test_a_folder_under_the_working_directory_is_named_relative_to_it(tmp_path, monkeypatch):
    from loop.report.card import shown

    (tmp_path / "outputs" / "run" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert shown(tmp_path / "outputs" / "run" / "final") == "outputs/run/final"


def test_the_card_names_the_tool_parser_the_added_tokens_and_how_tokens_were_picked(tmp_path, tokenizer):
    """Without a training run: the card of a starchat model (its tags added, Hermes calls) and of a model trained
    with Qwen3-Coder's own template (no markers, XML calls, rendered with template variables)."""
    from loop import config
    from loop.data import templates
    from loop.report.card import RunSummary, model_card
    from loop.training import sft
    from tests.data.test_released_templates import HERE

    cfg = config.from_dict({"model": {"name_or_path": str(tmp_path)}, "output": {"output_dir": str(tmp_path)},
                            "data": {"train_files": ["d.jsonl"]}})
    added = ("<|user|>", "<tool_call>")
    text = model_card(cfg, RunSummary(world_size=1, hardware="cpu", added_tokens=added), templates.serving(
        tokenizer.chat_template), "x", "model", tmp_path, sft.card(cfg, {})).text
    assert "--tool-call-parser hermes" in text and 'saved beside it as `"training"`' in text
    assert "- Vocabulary: 2 token(s) added for the chat template (`<|user|>`, `<tool_call>`), their embedding rows " \
           "started as the mean of the existing rows and trained" in text
    cfg = config.from_dict({"model": {"name_or_path": str(tmp_path)}, "output": {"output_dir": str(tmp_path)},
                            "data": {"train_files": ["d.jsonl"], "template": "tokenizer",
                                     "template_kwargs": {"enable_thinking": False}}})
    text = model_card(cfg, RunSummary(world_size=1, hardware="cpu", marked=False), (HERE / "qwen3-coder.jinja")
                      .read_text(), "x", "model", tmp_path, sft.card(cfg, {})).text
    assert "--tool-call-parser qwen3_coder" in text and "it has no markers" in text and "Vocabulary" not in text
    assert "{'enable_thinking': False}" in text and "Hermes" not in text
