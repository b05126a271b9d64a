"""The prepared-data cache is trusted like a checkpoint: a folder whose files do not match the digests written
with it is prepared again with one warning (same-size corruption, truncation, a meta.json missing or cut),
whether or not its files were stamped as verified by an earlier start, a preparation killed half way leaves
nothing that lasts, and two preparers never share a work folder, even with the same PID on the same host name."""

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from loop.data import cache
from loop.data import prepare as prep
from loop.data.prepare import open_prepared, prepare
from loop.data.records import DataError
from tests.data.test_prepare import data_config, jsonl


@pytest.fixture
def warnings(monkeypatch):
    """The warnings preparation logs (taken at the call: a run earlier in this process rewired the logger)."""
    warned: list[str] = []
    monkeypatch.setattr(prep.log, "warning", warned.append)
    return lambda: warned


def _same_size(path: Path, change) -> None:
    """Rewrite a file's data in place, its size and (for .npy) its header kept."""
    if path.suffix == ".npy":
        values = np.load(path)
        np.save(path, change(values).astype(values.dtype))
    else:
        values = np.fromfile(path, dtype=np.uint16 if path.name == "tokens.bin" else np.uint8)
        change(values).astype(values.dtype).tofile(path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_meta(path: Path) -> None:
    meta = json.loads(path.read_text())
    meta["dtype"] = "int8"
    path.write_text(json.dumps(meta))


CORRUPTIONS = {  # every case of issue 39, item 1
    "remapped token ids": lambda f: _same_size(f / "tokens.bin", lambda t: (t + 1) % 200),
    "trained.bin all ones": lambda f: _same_size(f / "trained.bin", np.ones_like),
    "flipped use.npy": lambda f: _same_size(f / "use.npy", lambda u: 1 - np.minimum(u, 1)),
    "truncated tokens.bin": lambda f: _truncate(f / "tokens.bin"),
    "truncated offsets.npy": lambda f: _truncate(f / "offsets.npy"),
    "truncated meta.json": lambda f: _truncate(f / "meta.json"),
    "missing meta.json": lambda f: (f / "meta.json").unlink(),
    "meta.json edited": lambda f: _edit_meta(f / "meta.json"),
}


@pytest.fixture
def source(tmp_path, corpus) -> str:
    return jsonl(tmp_path / "a.jsonl", corpus[:200])


def _arrays(data) -> dict[str, bytes]:
    c = data.columns
    return {"tokens": np.asarray(c.tokens).tobytes(), "trained": np.asarray(c.trained).tobytes(),
            "order": data.order.tobytes(), "pieces": np.asarray(data.train_rows.pieces).tobytes(),
            "eval": b"".join(np.asarray(r.pieces).tobytes() for r in data.eval_rows.values())}


def _stamp_all(folder: Path) -> None:
    """Every file of the folder stamped as verified, as a cache that started once looks: a file is stamped once
    the file system's clock has passed its last change (a tick, 1-10 ms, after it was written)."""
    listed = json.loads((folder / "meta.json").read_text())["files"].keys()
    for _ in range(200):
        cache.check(folder / "meta.json")
        if json.loads((folder / "meta.verified").read_text())["files"].keys() == listed:
            return
        time.sleep(0.01)
    pytest.fail("the files were never stamped")


@pytest.mark.parametrize("stamped", [False, True], ids=["fresh", "stamped"])
@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_cache_that_does_not_verify_is_prepared_again_with_one_warning(case, stamped, source, tokenizer, tmp_path,
                                                                         warnings):
    cfg = data_config(tmp_path, [source], eval_fraction=0.2)
    folder = prepare(cfg, tokenizer)
    before = _arrays(open_prepared(folder, cfg, seed=0))
    if stamped:
        _stamp_all(folder)
    CORRUPTIONS[case](folder)
    assert prepare(cfg, tokenizer) == folder
    (said,) = warnings()
    assert said.startswith(f"the data cache {folder} does not verify (") and said.endswith("preparing it again")
    assert _arrays(open_prepared(folder, cfg, seed=0)) == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # nothing left aside


def _counting(monkeypatch) -> list[str]:
    """The files `cache.digest` hashes from now on."""
    hashed: list[str] = []
    digest = cache.digest
    monkeypatch.setattr(cache, "digest", lambda path: hashed.append(path.name) or digest(path))
    return hashed


def test_a_stamped_cache_starts_without_hashing_and_a_change_with_its_times_put_back_is_still_caught(
        source, tokenizer, tmp_path, monkeypatch):
    """At 1M realistic dialogues hashing the cache at every start took 8 of its 11 s. ctime cannot be set from
    user space: a file rewritten and given its old mtime (and atime) back is hashed, and fails."""
    folder = prepare(data_config(tmp_path, [source]), tokenizer)
    _stamp_all(folder)
    hashed = _counting(monkeypatch)
    cache.check(folder / "meta.json")
    assert hashed == []
    tokens = folder / "tokens.bin"
    was = tokens.stat()
    _same_size(tokens, lambda t: (t + 1) % 200)
    os.utime(tokens, ns=(was.st_atime_ns, was.st_mtime_ns))
    assert (tokens.stat().st_size, tokens.stat().st_mtime_ns) == (was.st_size, was.st_mtime_ns)
    with pytest.raises(cache.Unverified, match="^tokens.bin does not match its digest$"):
        cache.check(folder / "meta.json")
    assert hashed == ["tokens.bin"]


@pytest.mark.parametrize("stamp", ["edited", "of another record", "cut", "not JSON"])
def test_a_stamp_that_is_edited_cut_or_of_another_record_means_every_file_is_hashed(stamp, source, tokenizer,
                                                                                     tmp_path, monkeypatch):
    folder = prepare(data_config(tmp_path, [source]), tokenizer)
    _stamp_all(folder)
    path = folder / "meta.verified"
    text = path.read_text()
    value = json.loads(text)
    if stamp == "edited":  # a file's key changed, the stamp's own digest left
        value["files"]["tokens.bin"][2] += 1
    elif stamp == "of another record":  # whole, its own digest right, written for another meta.json
        value["record"] = "0" * 32
        del value["digest"]
        value["digest"] = cache._own_digest(value)
    path.write_text(text[: len(text) // 2] if stamp == "cut" else "[" if stamp == "not JSON" else json.dumps(value))
    hashed = _counting(monkeypatch)
    cache.check(folder / "meta.json")
    assert sorted(hashed) == sorted(json.loads((folder / "meta.json").read_text())["files"])


def test_a_file_that_changes_while_it_is_hashed_is_not_stamped(source, tokenizer, tmp_path, monkeypatch):
    """Its digest was taken from what it was before: the next start hashes it again, and catches the change."""
    folder = prepare(data_config(tmp_path, [source]), tokenizer)
    time.sleep(0.05)  # past the clock tick the files were written in: each would be stamped
    (folder / "meta.verified").unlink()
    digest = cache.digest

    def then_changed(path: Path) -> str:
        said = digest(path)
        if path.name == "trained.bin":
            _same_size(path, np.ones_like)
        return said

    monkeypatch.setattr(cache, "digest", then_changed)
    cache.check(folder / "meta.json")  # what was hashed matched
    monkeypatch.undo()
    assert "trained.bin" not in json.loads((folder / "meta.verified").read_text())["files"]
    with pytest.raises(cache.Unverified, match="^trained.bin does not match its digest$"):
        cache.check(folder / "meta.json")


def test_corrupted_row_pieces_are_packed_again_with_one_warning(source, tokenizer, tmp_path, warnings):
    cfg = data_config(tmp_path, [source], eval_fraction=0.2)
    before = _arrays(open_prepared(prepare(cfg, tokenizer), cfg, seed=0))
    folder = prepare(cfg, tokenizer)
    (pieces,) = [p for p in folder.glob("rows-*-pieces.npy") if np.load(p).tobytes() == before["pieces"]]
    _same_size(pieces, lambda p: p[::-1])  # the same size: "135.3% full" on main
    assert _arrays(open_prepared(folder, cfg, seed=0)) == before
    (said,) = warnings()
    assert said.startswith(f"the packed rows in {folder} do not verify (") and "packing them again" in said
    assert _arrays(open_prepared(folder, cfg, seed=0)) == before and len(warnings()) == 1  # repaired on disk


def test_a_cache_whose_sources_are_gone_is_refused_in_one_line(source, tokenizer, tmp_path):
    cfg = data_config(tmp_path, [source])
    CORRUPTIONS["missing meta.json"](prepare(cfg, tokenizer))
    Path(source).unlink()
    with pytest.raises(DataError, match=f"^not found: {source}$"):
        prepare(cfg, tokenizer)


def test_a_preparation_killed_half_way_leaves_nothing_the_next_one_keeps(source, tokenizer, tmp_path):
    """A child process (forked: no imports) that dies inside its work folder, as SIGKILL leaves it; and a
    folder of the old naming (.tmp-KEY-PID, no lock) an hour old. A live preparation's folder is kept."""
    root = tmp_path / "cache"
    with cache.work_folder(root, "alive") as alive:
        child = os.fork()
        if child == 0:
            with cache.work_folder(root, "k"):
                os._exit(0)  # no clean-up runs: as if killed
        os.waitpid(child, 0)
        old = root / ".tmp-k-1"
        old.mkdir()
        os.utime(old, (0, 0))
        assert len(list(root.glob(".tmp-*"))) == 3
        prepare(data_config(tmp_path, [source]), tokenizer)
        assert [p.name for p in root.glob(".tmp-*")] == [alive.name]


def test_two_preparers_with_the_same_pid_and_host_name_never_share_a_work_folder(source, tokenizer, tmp_path,
                                                                                  monkeypatch):
    """Containers and nodes sharing a cache folder repeat PIDs (and may repeat host names): the names differ,
    and each preparer's lock keeps its folder from the other's clean-up."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setattr(socket, "gethostname", lambda: "node")
    cfg = data_config(tmp_path, [source])
    _, key = prep.key_of([prep.plan(s) for s in prep.resolve(cfg)], cfg, tokenizer)
    with cache.work_folder(tmp_path / "cache", key) as first:
        (first / "tokens.bin").write_bytes(b"half written")
        folder = prepare(cfg, tokenizer)
        assert (first / "tokens.bin").read_bytes() == b"half written"
        fd = os.open(first / cache.LOCK, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        cache.publish(first, folder)  # the slower one finishes: the verified folder of the same data is kept
        cache.check(folder / "meta.json")
    assert first.name.startswith(f".tmp-{key}-node-1-") and not first.exists()
    assert json.loads((folder / "meta.json").read_text())["files"]["tokens.bin"][0] > 0


def test_two_preparers_from_separate_pid_namespaces_at_once_both_finish_with_one_verified_folder(source, tokenizer,
                                                                                              tmp_path, monkeypatch):
    """Both forked, both PID 1 on host `node` (as two containers sharing a cache folder see it): on main at
    least one died in 5 of 6 rounds."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setattr(socket, "gethostname", lambda: "node")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    cfg = data_config(tmp_path, [source])
    children = []
    for _ in range(2):
        child = os.fork()
        if child == 0:
            try:
                prepare(cfg, tokenizer, progress=False)
                os._exit(0)
            except BaseException:  # noqa: BLE001 - the exit status says it
                os._exit(1)
        children.append(child)
    assert [os.waitstatus_to_exitcode(os.waitpid(c, 0)[1]) for c in children] == [0, 0]
    folder = prepare(cfg, tokenizer)
    cache.check(folder / "meta.json")
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
