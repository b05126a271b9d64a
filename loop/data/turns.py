"""Trained tokens of a chat template that does not mark them, found by rendering and checked per dialogue.

Released templates (Qwen, Llama, Mistral) have no `{% generation %}` markers. For each assistant turn the
template renders the conversation before it with the generation prompt (the prompt: exactly what a server
sends the model) and the conversation through it; the second must start with the first, and the answer is
what it adds, up to and including its last end token (what the template writes after that is its own, never
the model's). The answer's ids are the tokenizer's ids of that text after the prompt's ids: what the model
must produce when it is served that prompt. Nothing else is trained.

Per dialogue: where the template is prefix-preserving (the whole dialogue's rendering starts with every
prompt + answer, in text and in ids), the dialogue trains as one sequence with each answer marked. Where it
is not (Qwen3 drops earlier turns' reasoning, Mistral moves the system prompt and the tools to the last user
turn), it becomes one sequence per assistant turn, prompt + answer, the context exactly as the template
renders it at that turn (or is refused, with data.on_template_change: refuse).

Cost: 2k + 1 renders and tokenizations for k assistant turns, each as long as its prefix: quadratic in the
turns (a 20-turn dialogue is rendered and tokenized about 20 times its length), where a marked template
renders once. Dialogues longer than a row can hold are cut before rendering (tokenize.py), which bounds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from loop.data.records import Messages


class TurnError(ValueError):
    """The template's rendering of a dialogue gives no answer to train (its reason says where and why)."""


@dataclass
class Turns:
    """A dialogue as the template renders it turn by turn: the ids of the whole, and of each assistant turn's
    prompt and answer."""

    whole: np.ndarray
    prompts: list[np.ndarray]
    answers: list[np.ndarray]
    changed: str  # "" where every prompt + answer starts the whole rendering; else where and how it does not

    def one_sequence(self, answers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The whole rendering with each answer trained (cut after the first `answers` answers, if given)."""
        count = len(self.answers) if answers is None else answers
        mask = np.zeros(len(self.whole), dtype=np.uint8)
        for prompt, answer in zip(self.prompts[:count], self.answers[:count]):
            mask[len(prompt) : len(prompt) + len(answer)] = 1
        if answers is None:
            return self.whole, mask
        end = self.answer_ends()[count - 1]
        return self.whole[:end], mask[:end]

    def per_turn(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """One sequence per assistant turn: its prompt, untrained, then its answer, trained."""
        return [(np.concatenate([p, a]).astype(np.int32),
                 np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(a), np.uint8)])) for p, a in
                zip(self.prompts, self.answers)]

    def answer_ends(self) -> list[int]:
        """Where each answer ends in the whole rendering (valid where it is prefix-preserving)."""
        return [len(p) + len(a) for p, a in zip(self.prompts, self.answers)]


def _differs(whole: str, start: str) -> str:
    """Where `whole` stops starting with `start`, shown around that point."""
    at = next((i for i, (a, b) in enumerate(zip(whole, start)) if a != b), min(len(whole), len(start)))
    return f"at character {at}: {start[max(0, at - 30) : at + 30]!r} vs. {whole[max(0, at - 30) : at + 30]!r}"


def render_turns(messages: Messages, render: Callable[[Messages, bool], str],
                 encode: Callable[[list[str]], list[np.ndarray]], end: str | None) -> Turns:
    """The dialogue's turns as the template renders them; TurnError when an answer cannot be found.

    `render(messages, generation_prompt)` renders with the template (tools and variables bound), `encode` gives
    the ids of texts (no special tokens added), `end` is the token generation stops at."""
    turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    try:
        whole_text = render(messages, False)
        rendered = [(render(messages[:k], True), render(messages[: k + 1], False)) for k in turns]
    except Exception as e:  # a template's raise_exception, or Jinja failing on a field it does not expect
        raise TurnError(f"the chat template fails on this dialogue: {type(e).__name__}: {e}") from None
    answers_text = []
    for k, (prompt, through) in zip(turns, rendered):
        if not through.startswith(prompt):
            raise TurnError(f"messages[{k}]: the template renders the answered turn without its generation prompt "
                            f"before it ({_differs(through, prompt)}), so the answer cannot be found")
        answer = through[len(prompt):]
        if end and end in answer:
            answer = answer[: answer.rindex(end) + len(end)]  # the end token closes it; what follows is the template's
        if not answer.strip():
            raise TurnError(f"messages[{k}]: the template renders nothing for this assistant turn")
        answers_text.append(answer)
    ids = encode([whole_text] + [p for p, _ in rendered] + answers_text)
    whole, prompts, answers = ids[0], ids[1 : 1 + len(turns)], ids[1 + len(turns) :]
    changed = ""
    for k, (prompt, _), answer_text, p, a in zip(turns, rendered, answers_text, prompts, answers):
        if not whole_text.startswith(prompt + answer_text):
            changed = (f"messages[{k}]: the template renders this turn's context differently once later turns follow "
                       f"({_differs(whole_text, prompt + answer_text)})")
        elif len(whole) < len(p) + len(a) or not (np.array_equal(whole[: len(p)], p)
                                                  and np.array_equal(whole[len(p) : len(p) + len(a)], a)):
            changed = f"messages[{k}]: the whole dialogue tokenizes differently at this answer's boundaries"
        if changed:
            break
    return Turns(whole, prompts, answers, changed)
