"""The model card: its snippet loads what was saved and chats with it; its metadata and plot are there."""

from huggingface_hub import ModelCard

from tests.conftest import run_card_snippets


def test_the_cards_snippet_loads_the_saved_folder_and_answers(trained_run):
    final = trained_run / "final"
    card = ModelCard.load(final / "README.md")
    assert f'from_pretrained("{final.resolve()}"' in card.text  # not pushed: the folder's own path
    assert card.data.base_model and "bf16 training, saved as bf16" in card.text
    assert (final / "eval_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![eval loss](eval_loss.png)" in card.text
    assert int(run_card_snippets(final).split("new tokens:")[1]) >= 1  # the chat snippet generated an answer
