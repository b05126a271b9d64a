"""Tokenizing dialogues through the chat template: the ids and trained positions that
`tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)` gives, at a fraction of its cost,
with a dialogue longer than the row cut where it could have ended (cut_points: never inside a message, nor between
a tool call and its results) or dropped, and counted.

Why not apply_chat_template itself: it tokenizes one dialogue at a time and builds its mask in Python
token by token; here the same render (transformers' Jinja with the `{% generation %}` spans, or for the
named templates the renderer compiled from them, render.py) feeds one batched call of the Rust tokenizer,
and the mask comes from each span's two ends (`trained`). tests/data/test_templates.py proves the result
equal, over the whole corpus and every family; tests/data/test_render.py the compiled render equal to Jinja.
The cost of a dialogue stays linear in its length and bounded by the row: text that cannot fit is never
rendered (no token covers more characters than the vocabulary's longest entry), and the longest fitting
prefix is found by bisection, not by rendering every shorter prefix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loop.data import calls, render, templates, turns
from loop.data.records import DataError, Messages

if TYPE_CHECKING:  # transformers is imported only where Jinja renders: the named templates' workers never need it
    from transformers import PreTrainedTokenizerBase

OK, TRUNCATED, DROPPED = 0, 1, 2  # what became of a dialogue
STATUS = ("ok", "truncated", "dropped")
# An assistant message's reasoning, under the names transformers passes to templates (it fills each from the others)
REASONING = ("reasoning_content", "thinking", "reasoning")
_EMPTY = (np.zeros(0, np.int32), np.zeros(0, np.uint8))


@dataclass
class Encoded:
    """What one dialogue became: its sequences (one; one per assistant turn where an unmarked template renders
    earlier turns differently later, see turns.py; none when dropped or refused) and what happened to it."""

    pieces: list[tuple[np.ndarray, np.ndarray]]  # (ids, trained mask) of each sequence
    status: int  # OK, TRUNCATED or DROPPED
    per_turn: bool = False  # split into one sequence per assistant turn
    extra_tokens: int = 0  # what splitting costs: the pieces' tokens beyond the whole dialogue's
    refused: str = ""  # why it cannot be trained as the template renders it (a bad record)

    @property
    def ids(self) -> np.ndarray:
        """The first sequence's ids (the dialogue's, where it is one sequence)."""
        return (self.pieces or [_EMPTY])[0][0]

    @property
    def mask(self) -> np.ndarray:
        return (self.pieces or [_EMPTY])[0][1]


def normalize(messages: Messages) -> list[dict]:
    """What apply_chat_template does to messages before Jinja renders them."""
    from transformers.utils.chat_template_utils import _normalize_chat_messages

    return _normalize_chat_messages(messages)


class Encoder:
    """Dialogues to their sequences (ids, trained mask) and status, with one tokenizer, template and row length."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, seq_len: int, on_too_long: str,
                 template_kwargs: dict | None = None, on_template_change: str = "per_turn"):
        self.tokenizer, self.seq_len, self.on_too_long = tokenizer, seq_len, on_too_long
        self.backend = tokenizer.backend_tokenizer
        self.template = tokenizer.chat_template
        self.marked = templates.marks_generation(self.template)
        self.renders_tools = templates.renders_tools(self.template)
        self.template_kwargs = dict(tokenizer.special_tokens_map) | dict(template_kwargs or {})
        self.on_template_change = on_template_change
        self.end = tokenizer.eos_token
        self.compiled = render.compiled(self.template, self.template_kwargs, template_kwargs or {})
        self.max_token_chars = max(len(t) for t in tokenizer.get_vocab())

    def _render(self, dialogues: Sequence[Messages]) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Texts and assistant spans: by the compiled renderer where the template is a named one (render.py),
        else by transformers' Jinja, dialogues that share a tool list together."""
        texts: list = [None] * len(dialogues)
        spans: list = [None] * len(dialogues)
        groups: dict[str, tuple[list[int], list | None]] = {}
        for k, d in enumerate(dialogues):
            messages, tools = calls.split(d)
            done = self.compiled(messages, tools) if self.compiled else None
            if done is None:
                groups.setdefault(json.dumps(tools, sort_keys=True, default=str), ([], tools))[0].append(k)
            else:
                texts[k], spans[k] = done
        for at, tools in groups.values():
            from transformers.utils.chat_template_utils import render_jinja_template

            found = render_jinja_template(conversations=[normalize(calls.split(dialogues[k])[0]) for k in at],
                                          tools=tools, chat_template=self.template, return_assistant_tokens_mask=True,
                                          **self.template_kwargs)
            for k, text, span in zip(at, *found):
                texts[k], spans[k] = text, span
        return texts, spans

    def _tokens(self, dialogues: Sequence[Messages]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Ids and trained mask of whole dialogues, as apply_chat_template marks them: a token is trained
        when it overlaps a generation span."""
        texts, spans = self._render(dialogues)
        return [(np.asarray(encoding.ids, dtype=np.int32), trained(encoding, found))
                for encoding, found in zip(self.backend.encode_batch(texts, add_special_tokens=False), spans)]

    def _bounded(self, dialogue: Messages) -> int:
        """How many messages can possibly fit in a row: a prefix whose text has more characters than seq_len
        tokens can cover does not, whatever the tokenizer does with it."""
        budget, used = self.seq_len * self.max_token_chars, 0
        for i, message in enumerate(dialogue):
            content = message.get("content")
            used += len(content) if isinstance(content, str) else len(json.dumps(content, default=str))
            used += len(json.dumps(message["tool_calls"], default=str)) if message.get("tool_calls") else 0
            if used > budget:
                return i
        return len(dialogue)

    def encode(self, dialogues: Sequence[Messages]) -> list[Encoded]:
        """What each dialogue becomes, in order."""
        if not self.renders_tools and any(map(calls.uses_tools, dialogues)):
            raise DataError("the dialogues use tools, but the tokenizer's own chat template (data.template: "
                            "tokenizer) does not render tool calls; use data.template: chatml or starchat")
        out: list = [None] * len(dialogues)
        for k, d in enumerate(dialogues):
            if dropped := self._drops(d):
                out[k] = Encoded([], DROPPED, refused=dropped)
            elif not self.marked:
                out[k] = self._by_turns(d)
        rest = [k for k, e in enumerate(out) if e is None]
        for k, (ids, mask, status) in zip(rest, self._encode_marked([dialogues[k] for k in rest]) if rest else []):
            out[k] = Encoded([] if status == DROPPED else [(ids, mask)], status)
        return out

    def _drops(self, dialogue: Messages) -> str:
        """Why the template would silently leave out something the dialogue gives (its tools, an assistant's
        tool calls or reasoning), found by rendering with and without it; "" when it renders them all."""
        messages, tools = calls.split(dialogue)
        try:
            if tools and self._render_one(dialogue, False) == self._render_one(messages, False):
                return "the chat template drops the dialogue's tools (it renders the same without them)"
            for k, m in enumerate(messages):
                for group in (("tool_calls",), REASONING):
                    given = [field for field in group if m.get(field)]
                    if m.get("role") == "assistant" and given:
                        without = dialogue[:k] + [{key: v for key, v in m.items() if key not in group}]
                        if self._render_one(dialogue[: k + 1], False) == self._render_one(without, False):
                            return (f"messages[{k}]: the chat template drops its {given[0]} (it renders the same "
                                    "without it); use a template that renders it, or leave it out")
        except Exception:  # the template fails on it: said where the dialogue is rendered
            return ""
        return ""

    def _encode_marked(self, dialogues: Sequence[Messages]) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """(ids, mask, status) for each dialogue, with a template that marks its trained text; a dropped one has
        empty arrays."""
        empty = (np.zeros(0, np.int32), np.zeros(0, np.uint8), DROPPED)
        results: list = [None] * len(dialogues)
        whole, whole_at = [], []
        for k, d in enumerate(dialogues):
            fits = self._bounded(d)
            if fits == len(d):
                whole.append(d)
                whole_at.append(k)
            elif self.on_too_long == "drop":
                results[k] = empty
            else:
                results[k] = self._longest_prefix(d, fits) or empty
        for k, d, (ids, mask) in zip(whole_at, whole, self._tokens(whole) if whole else []):
            if len(ids) <= self.seq_len:
                results[k] = (ids, mask, OK)
            elif self.on_too_long == "drop":
                results[k] = empty
            else:
                results[k] = self._longest_prefix(d, len(d) - 1) or empty
        return results

    def _render_one(self, messages: Messages, generation_prompt: bool) -> str:
        plain, tools = calls.split(messages)
        if self.compiled and (done := self.compiled(plain, tools, generation_prompt)) is not None:
            return done[0]
        from transformers.utils.chat_template_utils import render_jinja_template

        (text,), _ = render_jinja_template(conversations=[normalize(plain)], tools=tools,
                                           chat_template=self.template, add_generation_prompt=generation_prompt,
                                           **self.template_kwargs)
        return text

    def _ids(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _by_turns(self, dialogue: Messages) -> Encoded:
        """A dialogue through a template without generation markers (see turns.py): one sequence where the
        template is prefix-preserving on it, else one per assistant turn or refused; cut or dropped to fit."""
        fits, status = self._bounded(dialogue), OK
        if fits < len(dialogue):
            if self.on_too_long == "drop":
                return Encoded([], DROPPED)
            ends = cut_points(dialogue, fits)
            if not ends:
                return Encoded([], DROPPED)
            dialogue, status = dialogue[: ends[-1]], TRUNCATED
        try:
            found = turns.render_turns(dialogue, self._render_one, self._ids, self.end)
        except turns.TurnError as e:
            return Encoded([], DROPPED, refused=str(e))
        if not found.changed:
            if len(found.whole) <= self.seq_len:
                return Encoded([found.one_sequence()], status)
            final = _final_answers(dialogue)
            fitting = max((k + 1 for k, end in enumerate(found.answer_ends()) if end <= self.seq_len and final[k]),
                          default=0)
            if self.on_too_long == "drop" or not fitting:
                return Encoded([], DROPPED)
            return Encoded([found.one_sequence(fitting)], TRUNCATED)
        if self.on_template_change == "refuse":
            return Encoded([], DROPPED, refused=found.changed + "; data.on_template_change: per_turn trains it as "
                           "one sequence per assistant turn")
        pieces, final = found.per_turn(), _final_answers(dialogue)
        fitting = next((i for i, (ids, _) in enumerate(pieces) if len(ids) > self.seq_len), len(pieces))
        if fitting < len(pieces):  # cut after the last answer before it that calls no tool (cut_points)
            fitting = max((k + 1 for k in range(fitting) if final[k]), default=0)
        if fitting < len(pieces) and (self.on_too_long == "drop" or not fitting):
            return Encoded([], DROPPED)
        kept = pieces[:fitting]
        extra = sum(len(ids) for ids, _ in kept[:-1])  # the last piece holds the whole dialogue it reaches
        return Encoded(kept, status if fitting == len(pieces) else TRUNCATED, per_turn=True, extra_tokens=int(extra))

    def _longest_prefix(self, dialogue: Messages, within: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """The longest prefix of at most `within` messages that ends where the dialogue could have ended
        (cut_points) and fits in a row."""
        ends = cut_points(dialogue, within)
        best, lo, hi = None, 0, len(ends) - 1
        while lo <= hi:  # a longer prefix is never fewer tokens
            mid = (lo + hi) // 2
            ((ids, mask),) = self._tokens([dialogue[: ends[mid]]])
            if len(ids) <= self.seq_len:
                best, lo = (ids, mask, TRUNCATED), mid + 1
            else:
                hi = mid - 1
        return best


def cut_points(dialogue: Messages, within: int | None = None) -> list[int]:
    """Where a dialogue too long for a row may be cut (message counts of the prefixes kept, among its first
    `within` messages): only where the dialogue could have ended, after an assistant turn that calls no tool.

    So a cut dialogue is itself a valid one (dialogues.validate takes it): it ends on the assistant's answer,
    every tool call in it has all its results and the assistant turn that reads them, and no message is cut
    inside. Not after a turn that calls a tool: the row would end on a call nobody answered. Not after the
    results of a call: they are untrained (a whole file, thousands of tokens, paid for in the row and never
    learned) and the row would end with the assistant still at work. An agent trajectory that is one task, its
    only answer at the end, has no such point before it and is dropped (counted as dropped too long), never
    trained on a piece. Where a template trains one sequence per assistant turn (turns.py), the sequences kept
    are those of that prefix. (TRL cuts tokens, keep_start or keep_end; LLaMA-Factory cuts each turn's prompt and
    reply to a token budget; axolotl drops or cuts tokens: each may split a call, a result or a message.)"""
    return [i + 1 for i, m in enumerate(dialogue[:within]) if m.get("role") == "assistant" and not m.get("tool_calls")]


def _final_answers(dialogue: Messages) -> list[bool]:
    """For each assistant turn in order: whether the dialogue may be cut after it (cut_points)."""
    return [not m.get("tool_calls") for m in dialogue if m.get("role") == "assistant"]


def trained(encoding: Any, spans: list[tuple[int, int]] | None) -> np.ndarray:
    """The trained mask of one encoding: every token overlapping a span (character offsets), as apply_chat_template
    marks them. Each span's tokens are found from its two ends (`char_to_token`) and widened over any neighbour that
    overlaps it too (a character split over several tokens), rather than by reading every token's offsets back
    into Python, which cost more than the tokenizing. Offsets follow the text, as every tokenizers pipeline gives
    them; where an end lies in no token (a trimmed space) the offsets are read after all."""
    n = len(encoding)
    mask = np.zeros(n, dtype=np.uint8)
    for start, end in spans or ():
        lo, hi = encoding.char_to_token(start), encoding.char_to_token(end - 1) if end > start else None
        if lo is None or hi is None:
            return _trained_by_offsets(encoding, spans)
        while lo > 0 and _overlaps(encoding.token_to_chars(lo - 1), start, end):
            lo -= 1
        while hi + 1 < n and _overlaps(encoding.token_to_chars(hi + 1), start, end):
            hi += 1
        mask[lo : hi + 1] = 1
    return mask


def _overlaps(chars: tuple[int, int] | None, start: int, end: int) -> bool:
    return chars is not None and chars[0] < end and chars[1] > start


def _trained_by_offsets(encoding: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    """The same mask from every token's offsets: the first span ending after a token's start holds it if it starts
    before the token ends."""
    mask = np.zeros(len(encoding), dtype=np.uint8)
    if len(mask):
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = np.asarray(spans, dtype=np.int64).reshape(-1, 2).T
        span = np.searchsorted(ends, offsets[:, 0], side="right")
        inside = span < len(ends)
        mask[inside] = starts[span[inside]] < offsets[inside, 1]
    return mask


def decision(encoded: Encoded) -> str:
    """What became of a dialogue, as tools/inspect_data.py shows it."""
    if encoded.refused:
        return f"refused: {encoded.refused}"
    if encoded.status == DROPPED:
        return "dropped: too long for a row"
    cut = ", cut after an answer that calls no tool, to fit" if encoded.status == TRUNCATED else ""
    if encoded.per_turn:
        return f"one sequence per assistant turn ({len(encoded.pieces)} sequences, +{encoded.extra_tokens} tokens){cut}"
    return f"one sequence{cut}"


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    return fingerprint(tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template)


def tokenize(dialogues: list[Messages], tokenizer: PreTrainedTokenizerBase, seq_len: int, on_too_long: str,
             report=None, template_kwargs: dict | None = None):
    """A small set of dialogues tokenized in this process, as a Dataset of input_ids and assistant_mask (dropped
    ones left out); counts truncated and dropped dialogues into `report` (a DataReport). A run prepares its
    data in parallel and memory-maps it (prepare.py); this is for tools, benchmarks and tests."""
    import datasets

    encoded = Encoder(tokenizer, seq_len, on_too_long, template_kwargs).encode(dialogues)
    refused = [f"dialogue {k}: {e.refused}" for k, e in enumerate(encoded) if e.refused]
    if refused:
        raise DataError("the chat template cannot train these dialogues as it renders them:\n  " + "\n  ".join(refused))
    kept = [(ids.tolist(), mask.tolist()) for e in encoded for ids, mask in e.pieces]
    if report is not None:
        report.truncated += sum(e.status == TRUNCATED for e in encoded)
        report.dropped_too_long += sum(e.status == DROPPED for e in encoded)
    return datasets.Dataset.from_dict({"input_ids": [ids for ids, _ in kept], "assistant_mask": [m for _, m in kept]},
                                      features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                                                  "assistant_mask": datasets.List(datasets.Value(
                                                                      "int8"))}))
