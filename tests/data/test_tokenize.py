"""Tokenizing costs what the input's size does: a 5,000-turn dialogue and a 50 MB line cost about what a row
can hold, not the square of their turns or many times their size; and a dialogue too long for a row is cut only
where it could have ended, never between a tool call and its results, or dropped, and counted. (That the ids and
trained positions equal apply_chat_template's, over the whole corpus and every family: tests/data/test_templates.py.)"""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from loop.data import calls, templates
from loop.data.dialogues import validate
from loop.data.tokenize import DROPPED, OK, TRUNCATED, Encoder, cut_points
from tests.conftest import ROOT


def test_a_5000_turn_dialogue_is_cut_to_its_longest_fitting_prefix_in_well_under_2_seconds(tokenizer):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "words " * (i % 7)}
             for i in range(5000)]
    start = time.perf_counter()
    (encoded,) = Encoder(tokenizer, 1024, "truncate").encode([turns])
    ids, mask, status = encoded.ids, encoded.mask, encoded.status
    assert time.perf_counter() - start < 2.0
    assert status == TRUNCATED and len(ids) <= 1024
    # It is a prefix ending on an answer, exactly as apply_chat_template encodes it, and the next one is too long.
    end = next(k for k in range(2, len(turns) + 1, 2) if templates.encode(tokenizer, turns[:k])[0] == ids.tolist())
    assert mask.tolist() == templates.encode(tokenizer, turns[:end])[1]
    assert len(templates.encode(tokenizer, turns[: end + 2])[0]) > 1024


MEASURE = """
import resource, sys, json
from transformers import AutoTokenizer
from loop import config
from loop.data import templates
from loop.data.prepare import prepare
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1]); templates.install(tokenizer, "starchat")
cfg = config.from_dict({"data": {"train_files": [sys.argv[2]], "cache_dir": sys.argv[3], "eval_fraction": 0}}).data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare(cfg, tokenizer, progress=False)
print(json.dumps({"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_a_50_mb_line_costs_a_few_times_its_size(tiny_dir, corpus, tmp_path):
    """In a fresh interpreter, so that its peak memory is its own."""
    path = tmp_path / "big.jsonl"
    huge = [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": "x" * 50_000_000}]
    path.write_text(json.dumps({"messages": huge}) + "\n" + json.dumps({"messages": corpus[0]}) + "\n")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tiny_dir / "model"), str(path), str(tmp_path / "c")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
    assert peak < 3.5 * 50, peak  # 143 MB here: read, parsed, hashed once; text that cannot fit is never rendered
    (encoded,) = Encoder(tokenizer_of(tiny_dir), 1024, "truncate").encode([huge])
    assert encoded.status == DROPPED and not encoded.pieces  # not even its first answer fits in a row


def tokenizer_of(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    templates.install(tok, "starchat")
    return tok


READ = {"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}


def session(tasks: int = 3) -> list[dict]:
    """An agent session of `tasks` tasks, each: a question, two parallel calls and their results, one more call and
    its result, an answer that calls nothing. Its results are parts of a real file, long enough that a row of a few
    hundred tokens is cut before rendering too (tokenize.Encoder._bounded)."""
    text = (ROOT / "loop" / "data" / "calls.py").read_text()
    messages, n = [{"role": "system", "content": "You read files before you answer."}], 0
    for t in range(tasks):
        ids = [f"call{n + k:05d}" for k in range(3)]
        n += 3
        made = [calls.call("read_file", {"path": f"part{t}-{k}.py"}, ids[k]) for k in range(3)]
        messages += [{"role": "user", "content": f"Task {t}: what do parts {t}-0 to {t}-2 of calls.py say?"},
                     {"role": "assistant", "content": "Reading the first two.", "tool_calls": made[:2]},
                     *[{"role": "tool", "tool_call_id": ids[k], "name": "read_file",
                        "content": text[(3 * t + k) * 700 : (3 * t + k + 1) * 700]} for k in range(2)],
                     {"role": "assistant", "content": None, "tool_calls": made[2:]},
                     {"role": "tool", "tool_call_id": ids[2], "name": "read_file",
                      "content": text[(3 * t + 2) * 700 : (3 * t + 3) * 700]},
                     {"role": "assistant", "content": f"Parts {t}-0 to {t}-2 define the tool-call schema."}]
    return calls.attach(messages, [READ])


def test_a_session_is_cut_only_where_it_could_have_ended_never_between_a_call_and_its_results(tokenizer):
    """Through the real tokenizer and template, for every row length around every message's end: the row is the
    session's longest prefix that ends on an answer calling no tool (exactly the prefixes dialogues.validate
    takes: every call answered by all its results) and fits, with the ids and trained positions
    apply_chat_template gives that prefix; a row that holds only a call and its results drops the session."""
    whole = session()
    ends = cut_points(whole)
    assert ends == [k for k in range(1, len(whole) + 1) if validate(whole[:k]) is None] == [8, 15, 22]
    lengths = {k: len(templates.encode(tokenizer, whole[:k])[0]) for k in range(2, len(whole) + 1)}
    for seq_len in sorted({n + d for n in lengths.values() for d in (-1, 0, 1)}):
        (got,) = Encoder(tokenizer, seq_len, "truncate").encode([whole])
        fitting = [k for k in ends if lengths[k] <= seq_len]
        if not fitting:
            assert got.status == DROPPED and not got.pieces, seq_len
            continue
        k = fitting[-1]
        assert got.status == (OK if k == len(whole) else TRUNCATED), seq_len
        assert (got.ids.tolist(), got.mask.tolist()) == templates.encode(tokenizer, whole[:k]), seq_len
    # The rows where a cut at any assistant turn would have ended on a call (before: the call kept, its results not)
    (first_call,) = Encoder(tokenizer, lengths[7], "truncate").encode([whole])  # task 0 but its answer
    assert first_call.status == DROPPED
    (second_task,) = Encoder(tokenizer, lengths[14], "truncate").encode([whole])  # task 1 but its answer
    assert second_task.status == TRUNCATED and len(second_task.ids) == lengths[8]
    assert tokenizer.decode(second_task.ids).endswith("Parts 0-0 to 0-2 define the tool-call schema.<|end|>\n")


def test_too_long_sessions_are_counted_in_the_data_report_as_cut_or_dropped(tokenizer, tmp_path):
    """Through the run's data preparation: a session that fits, one cut after its first task, and one that is a
    single task (its only answer at the end, so no cut point fits) and is dropped even with truncate."""
    from loop import config
    from loop.data.prepare import open_prepared, prepare

    fits, cut = session(1), session(3)
    middle = {"user": ("Task 1", "Task 2"), "assistant": ("Parts 0", "Parts 1")}  # the questions and answers between
    single = [m for m in cut if not (m.get("content") or "").startswith(middle.get(m["role"], ()))]
    assert validate(single) is None and cut_points(single) == [len(single)]
    seq_len = len(templates.encode(tokenizer, fits)[0]) + 5
    path = tmp_path / "sessions.jsonl"
    path.write_text("".join(json.dumps({"messages": calls.split(d)[0], "tools": [READ]}) + "\n"
                            for d in (fits, cut, single)))
    for on_too_long, rows, truncated, dropped in (("truncate", 2, 1, 1), ("drop", 1, 0, 2)):
        data = {"train_files": [str(path)], "cache_dir": str(tmp_path / on_too_long), "eval_fraction": 0,
                "num_proc": 1, "seq_len": seq_len, "on_too_long": on_too_long}
        cfg = config.from_dict({"data": data}).data
        prepared = open_prepared(prepare(cfg, tokenizer, progress=False), cfg, seed=0)
        total = prepared.report.total
        assert (len(prepared.order), total.truncated, total.dropped_too_long) == (rows, truncated, dropped)
        assert f"truncated {truncated}, dropped as too long {dropped}" in prepared.report.describe()


@pytest.mark.parametrize("name", ["qwen2.5-coder", "qwen3"])
def test_a_template_without_markers_cuts_the_same_way(tiny_dir, name):
    """Released templates (turns.py): Qwen2.5-Coder's trains the session as one sequence, Qwen3's as one per
    assistant turn; either way a cut keeps what the session's prefix through its last fitting answer trains."""
    from tests.data.test_released_templates import released

    tok, whole = released(tiny_dir, name), session()
    valid = [k for k in range(1, len(whole) + 1) if validate(whole[:k]) is None]  # the prefixes it could end at
    reference = {k: Encoder(tok, 10**6, "drop").encode([whole[:k]])[0] for k in valid}
    needed = {k: max(_answered(ids, mask)[0].size for ids, mask in e.pieces) for k, e in reference.items()}
    assert reference[len(whole)].per_turn == (name == "qwen3")
    for seq_len in sorted({n + d for n in needed.values() for d in (-1, 0)}):
        (got,) = Encoder(tok, seq_len, "truncate").encode([whole])
        fitting = [k for k in reference if needed[k] <= seq_len]
        if not fitting:
            assert got.status == DROPPED and not got.pieces, seq_len
            continue
        want = reference[fitting[-1]]
        assert len(got.pieces) == len(want.pieces), seq_len
        for (ids, mask), (want_ids, want_mask) in zip(got.pieces, want.pieces):
            assert [a.tolist() for a in _answered(ids, mask)] == [a.tolist() for a in _answered(want_ids, want_mask)]
    assert fitting[-1] == len(whole)  # the longest row holds every answer of the session


def _answered(ids, mask):
    """A sequence through its last trained token (what follows an answer's end token is the template's)."""
    end = int(np.flatnonzero(mask)[-1]) + 1
    return ids[:end], mask[:end]
