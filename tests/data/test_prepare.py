"""A run's data: mixtures of weighted sources, duplicates and the eval split by content, per-source reports
and eval sets, the cache the next run starts from alone, and what is refused before anything is read."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from loop import config
from loop.data import prepare as prep
from loop.data import sources, workers
from loop.data.prepare import open_prepared, prepare
from loop.data.records import DataError


def data_config(tmp_path: Path, train, eval_files=(), **settings) -> config.DataConfig:
    return config.from_dict({"data": {"train_files": list(train), "eval_files": list(eval_files), "seq_len": 256,
                                      "cache_dir": str(tmp_path / "cache"), **settings}}).data


def jsonl(path: Path, dialogues) -> str:
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogues))
    return str(path)


def texts(data, indices) -> set[str]:
    """The token sequences of these dialogues, as bytes: equal dialogues give equal ones."""
    c = data.columns
    return {c.tokens[c.offsets[i] : c.offsets[i + 1]].tobytes() for i in indices}


def test_a_second_run_starts_from_the_cache_alone_and_the_key_follows_what_the_data_is(tokenizer, corpus, tmp_path,
                                                                                      monkeypatch):
    path = jsonl(tmp_path / "a.jsonl", corpus[:300])
    first = prepare(data_config(tmp_path, [path]), tokenizer)
    monkeypatch.setattr(prep, "_build", lambda *a: pytest.fail("prepared again"))
    assert prepare(data_config(tmp_path, [path]), tokenizer) == first
    monkeypatch.undo()
    assert prepare(data_config(tmp_path, [path], seq_len=512), tokenizer) != first
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    from loop.data import templates

    templates.install(other, "chatml")
    assert prepare(data_config(tmp_path, [path]), other) != first
    jsonl(tmp_path / "a.jsonl", corpus[1:301])  # the same file name, other dialogues
    assert prepare(data_config(tmp_path, [path]), tokenizer) != first
    data = open_prepared(first, data_config(tmp_path, [path]), seed=0)
    assert data.columns.tokens.dtype == np.uint16 and isinstance(data.columns.tokens, np.memmap)  # 2 bytes a token


def test_duplicates_are_counted_kept_once_on_request_and_never_on_both_sides_of_the_split(tokenizer, corpus,
                                                                                         tmp_path):
    dialogues = corpus[:100] + corpus[:40] * 3  # 120 copies of 40 dialogues
    path = jsonl(tmp_path / "d.jsonl", dialogues)
    for dedup in (False, True):
        cfg = data_config(tmp_path, [path], dedup=dedup, eval_fraction=0.3)
        data = open_prepared(prepare(cfg, tokenizer), cfg, seed=0)
        (report,) = data.report.sources
        assert report.duplicates == 120 and report.dialogues == 220
        held = data.eval_rows["d"].pieces[:, 0]
        assert not texts(data, held) & texts(data, data.order)  # no copy of a training dialogue is held out
        assert len(data.order) + len(held) == (100 if dedup else 220)
        assert 0.15 < len(held) / (len(data.order) + len(held)) < 0.45


def test_weights_take_a_share_or_repeat_and_the_order_is_a_function_of_the_seed(tokenizer, corpus, tmp_path):
    a, b = jsonl(tmp_path / "a.jsonl", corpus[:200]), jsonl(tmp_path / "b.jsonl", corpus[200:260])
    cfg = data_config(tmp_path, [{"path": a, "weight": 0.25}, {"path": b, "weight": 3, "name": "beta"}],
                      eval_fraction=0)
    data = open_prepared(prepare(cfg, tokenizer), cfg, seed=1)
    ra, rb = data.report.sources
    assert (ra.name, rb.name) == ("a", "beta") and rb.weighted == 3 * rb.dialogues
    assert 30 < ra.weighted < 70  # a quarter of 200, chosen by seed
    assert len(set(data.order[: ra.weighted].tolist())) == ra.weighted  # each once
    assert np.array_equal(open_prepared(data.folder, cfg, seed=1).order, data.order)
    assert not np.array_equal(open_prepared(data.folder, cfg, seed=2).order, data.order)
    assert sum(len(set(row)) == len(row) for row in (data.train_rows.row(j) for j in range(len(data.train_rows))))
    assert data.train_rows.tokens() == int(data.columns.lengths()[data.order].sum())  # every copy packed
    scalars = data.report.as_scalars()
    assert scalars["data/mixture/beta/dialogues"] == 180 and "data/mixture/a/dialogues" in scalars
    shares = [line for line in data.report.describe_sources() if "of trained tokens" in line]
    assert len(shares) == 2


def test_each_source_is_held_out_and_evaluated_on_its_own_and_an_eval_file_can_name_one(tokenizer, corpus, tmp_path):
    a, b = jsonl(tmp_path / "a.jsonl", corpus[:300]), jsonl(tmp_path / "b.jsonl", corpus[300:600])
    cfg = data_config(tmp_path, [a, b], eval_fraction=0.2)
    data = open_prepared(prepare(cfg, tokenizer), cfg, seed=0)
    assert set(data.eval_rows) == {"a", "b"} and all(len(r) for r in data.eval_rows.values())
    extra = jsonl(tmp_path / "held.jsonl", corpus[600:650])
    cfg = data_config(tmp_path, [a, b], eval_files=[{"path": extra, "name": "b"}])
    data = open_prepared(prepare(cfg, tokenizer), cfg, seed=0)
    assert set(data.eval_rows) == {"b"} and data.report.sources[2].role == "eval"
    trainable = sum(s.dialogues - s.dropped_too_long for s in data.report.sources[:2])
    assert len(data.order) == trainable > 590  # with eval files, no train source is split


def test_a_dataset_in_the_hubs_folder_layout_loads_through_the_same_path_as_an_id(tokenizer, corpus, tmp_path):
    """Parquet files under data/ named by split and a README with configs, as the Hub serves a dataset; no
    network: the folder goes through datasets.load_dataset as `HuggingFaceH4/ultrachat_200k` would."""
    import datasets

    root = tmp_path / "ultrachat"
    (root / "data").mkdir(parents=True)
    for split, part in (("train_sft", corpus[:80]), ("test_sft", corpus[80:100])):
        datasets.Dataset.from_list([{"prompt": d[0]["content"], "messages": d} for d in part]).to_parquet(
            root / "data" / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_sft\n"
                                    "    path: data/train_sft-*\n  - split: test_sft\n    path: data/test_sft-*\n---\n")
    cfg = data_config(tmp_path, [{"path": str(root), "split": "train_sft", "config": "default", "name": "chat"}],
                      eval_files=[{"path": str(root), "split": "test_sft", "name": "chat"}])
    data = open_prepared(prepare(cfg, tokenizer), cfg, seed=0)
    assert [(s.records, s.dialogues) for s in data.report.sources] == [(80, 80), (20, 20)]
    with pytest.raises(DataError, match="cannot be loaded as a dataset folder"):
        prepare(data_config(tmp_path, [{"path": str(root), "split": "nope"}]), tokenizer)


def test_the_same_source_twice_and_two_sources_of_one_name_are_refused_before_reading(tokenizer, corpus, tmp_path):
    path = jsonl(tmp_path / "a.jsonl", corpus[:10])
    with pytest.raises(DataError, match="is given twice; to train on it more than once, give it a weight"):
        prepare(data_config(tmp_path, [path, path]), tokenizer)
    (tmp_path / "x").mkdir()
    other = jsonl(tmp_path / "x" / "a.jsonl", corpus[10:20])
    with pytest.raises(DataError, match="two sources are named 'a'; give each a name"):
        prepare(data_config(tmp_path, [path, other]), tokenizer)
    assert prepare(data_config(tmp_path, [path, {"path": other, "name": "other"}]), tokenizer).is_dir()


def test_formats_are_recognised_per_source_and_a_mismatch_says_what_to_set(tokenizer, corpus, tmp_path):
    share = tmp_path / "share.jsonl"
    share.write_text("".join(json.dumps({"conversations": [{"from": "human" if m["role"] == "user" else "gpt",
                                                            "value": m["content"]} for m in d]}) + "\n"
                             for d in corpus[:30]))
    trl = tmp_path / "trl.jsonl"  # TRL's conversational prompt-completion
    trl.write_text("".join(json.dumps({"prompt": d[:1], "completion": d[1:2]}) + "\n" for d in corpus[:30]))
    mine = jsonl(tmp_path / "mine.jsonl", corpus[30:60])
    cfg = data_config(tmp_path, [str(share), str(trl), mine], eval_fraction=0)
    data = open_prepared(prepare(cfg, tokenizer), cfg, seed=0)
    assert [s.dialogues for s in data.report.sources] == [30, 30, 30]
    with pytest.raises(DataError) as refused:
        prepare(data_config(tmp_path, [{"path": str(share), "format": "messages"}]), tokenizer)
    said = str(refused.value)
    assert f"{share}:1: no 'messages' field" in said
    assert "these records look like sharegpt: set data.format: sharegpt (or format: sharegpt on this source)" in said
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"dialog": d}) + "\n" for d in corpus[:5]))
    cfg = data_config(tmp_path, [{"path": str(renamed), "columns": {"dialog": "messages"}}], eval_fraction=0)
    assert open_prepared(prepare(cfg, tokenizer), cfg, seed=0).report.sources[0].dialogues == 5


def test_bad_records_of_a_mixture_name_their_own_file_and_line(tokenizer, corpus, tmp_path):
    good = jsonl(tmp_path / "good.jsonl", corpus[:20])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": corpus[0]}) + "\n" + "[" * 200_000 + "\n"
                   + '{"messages": [], "messages": []}\n' + '{"messages": [\n')
    with pytest.raises(DataError) as refused:
        prepare(data_config(tmp_path, [good, str(bad)]), tokenizer)
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("3 bad record(s)")
    assert lines[1:4] == [f"  {bad}:2: invalid JSON (nested too deeply to be a record)",
                          f"  {bad}:3: invalid JSON (the key 'messages' appears twice in one object)",
                          f"  {bad}:4: invalid JSON (Expecting value, column 15)"]
    cfg = data_config(tmp_path, [good, str(bad)], on_bad_record="skip")
    skipped = open_prepared(prepare(cfg, tokenizer), cfg, seed=0).report.sources[1]
    assert skipped.skipped["invalid_json"] == 3 and skipped.dialogues == 1


def test_workers_prepare_exactly_what_one_process_prepares(tokenizer, corpus, tmp_path, monkeypatch):
    """Several units read by two worker processes (started with spawn, about 5 s of imports on this
    machine) give the same arrays, in the same order, as one process reading them all."""
    monkeypatch.setattr(sources, "plan_lines", functools.partial(sources.plan_lines, chunk_bytes=20_000))
    path = jsonl(tmp_path / "a.jsonl", corpus)
    one, two = (open_prepared(prepare(data_config(tmp_path / str(n), [path], num_proc=n), tokenizer),
                              data_config(tmp_path / str(n), [path]), seed=0) for n in (1, 2))
    assert len(sources.plan(sources.resolve(data_config(tmp_path, [path]))[0]).units) > 5
    for name in ("tokens", "trained", "offsets", "trained_counts"):
        assert np.array_equal(getattr(one.columns, name), getattr(two.columns, name)), name
    assert np.array_equal(one.order, two.order) and one.report == two.report
    columns, o = one.columns, one.columns.offsets  # flags packed a bit each across every unit's boundary
    assert [int(columns.trained[o[i] : o[i + 1]].sum()) for i in range(len(columns))] == columns.trained_counts.tolist()


def test_small_data_is_prepared_without_worker_processes(tokenizer, corpus, tmp_path, monkeypatch):
    """With num_proc 0 (the default) workers start only for data worth their start (2-5 s of imports each): the
    test corpus is prepared in this process; past WORKER_BYTES they would start."""
    import concurrent.futures

    def no_pool(*args, **kwargs):
        raise AssertionError("worker processes started")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    path = jsonl(tmp_path / "a.jsonl", corpus)
    monkeypatch.setattr(sources, "plan_lines", functools.partial(sources.plan_lines, chunk_bytes=20_000))
    prepared = open_prepared(prepare(data_config(tmp_path / "c", [path]), tokenizer), data_config(tmp_path, [path]), 0)
    assert len(prepared.columns.offsets) > 1  # several units, all read here
    monkeypatch.setattr(workers, "WORKER_BYTES", Path(path).stat().st_size)
    with pytest.raises(AssertionError, match="worker processes started"):
        prepare(data_config(tmp_path / "d", [path]), tokenizer)
