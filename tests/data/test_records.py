"""Reading records: a corrupted Parquet file is a bad record named by file and row group, exit 2, every time
(issue 25: it once exited 134 after the right message, one run in three); a file that is no readable file
(a FIFO, a directory, unreadable), an unreadable cache and a YAML alias bomb are each one line (issue 39)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loop.data.prepare import prepare
from loop.data.records import DataError, read_records
from tests.conftest import ROOT
from tests.data.test_prepare import data_config, jsonl


def test_a_corrupted_parquet_file_is_one_named_bad_record_and_exit_2_every_time(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": "an answer " * 8}]} for i in range(3000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "good.parquet", row_group_size=500)
    data = bytearray((tmp_path / "good.parquet").read_bytes())
    data[len(data) // 2:len(data) // 2 + 2000] = bytes(2000)  # one row group's pages zeroed, the footer intact
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    for _ in range(3):
        done = subprocess.run([sys.executable, "tools/convert_data.py", "auto", str(tmp_path / "bad.parquet"),
                               "--out", str(tmp_path / "out.jsonl")], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert f"{tmp_path / 'bad.parquet'}[row group " in done.stderr and "unreadable Parquet row group" in done.stderr
        assert "fix them or pass --skip-bad" in done.stderr  # the tool's own option, not the config key


def _refused(call) -> str:
    with pytest.raises(DataError) as refused:
        list(call())
    said = str(refused.value)
    assert len(said.splitlines()) == 1, said
    return said


def test_a_train_file_that_is_no_readable_file_is_one_line_before_anything_is_read(tokenizer, tmp_path, monkeypatch):
    """A FIFO hung the run (and tools/launch.py's pre-check) forever; a directory named `*.jsonl` and an
    unreadable file gave tracebacks. Each is said by the run's data path and by read_records (DPO, tools)."""
    fifo, folder, good = tmp_path / "fifo.jsonl", tmp_path / "folder.jsonl", tmp_path / "good.jsonl"
    os.mkfifo(fifo)
    folder.mkdir()
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    cases = {fifo: "is a named pipe (FIFO), not a file", folder: "is a directory, not a file"}
    for path, reason in cases.items():
        assert _refused(lambda p=path: [prepare(data_config(tmp_path, [str(p)]), tokenizer)]) == f"{path} {reason}"
        assert _refused(lambda p=path: read_records(str(p))) == f"{path} {reason}"
    opened = Path.open

    def denied(self, *args, **kwargs):  # tests run as root, whom file modes do not stop: the error itself
        if self == good:
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    expected = f"{good} cannot be read (Permission denied)"
    assert _refused(lambda: [prepare(data_config(tmp_path, [str(good)]), tokenizer)]) == expected
    assert _refused(lambda: read_records(str(good))) == expected


def test_an_unreadable_cache_folder_is_one_line(tokenizer, corpus, tmp_path, monkeypatch):
    cfg = data_config(tmp_path, [jsonl(tmp_path / "a.jsonl", corpus[:20])])
    folder = prepare(cfg, tokenizer)
    read = Path.read_bytes

    def denied(self):
        if self.parent == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return read(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    said = _refused(lambda: [prepare(cfg, tokenizer)])
    assert said == (f"cannot read the data cache {folder} (Permission denied); set data.cache_dir to a folder this "
                    "run may read and write")


def test_a_yaml_data_file_with_an_alias_bomb_or_a_syntax_error_is_a_bad_record_said_without_its_value(tmp_path):
    from tests.config.test_parse import BOMB

    bomb, broken = tmp_path / "bomb.yaml", tmp_path / "broken.yaml"
    bomb.write_text(BOMB)
    broken.write_text("- messages:\n  - role: user\n   content: x\n")
    ((where, found),) = read_records(str(bomb))
    assert where == str(bomb) and re.fullmatch(r"its YAML aliases expand to more than [\d,]+ values; write the "
                                               r"values out", str(found))
    ((_, found),) = read_records(str(broken))
    assert str(found) == "invalid YAML at line 3, column 4: expected <block end>, but found '<block mapping start>'"


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hanging_and_crashing_inputs_end_in_one_line_and_exit_2_in_the_run_the_launcher_and_inspect_data(
        tiny_dir, tmp_path, capsys):
    """In process (no launch): a FIFO as the train file and as the config, and a tool call whose arguments
    nest 10,000 deep (RecursionError on main, even with on_bad_record: skip, which now counts it)."""
    from loop import launch
    from tests.conftest import run_in_process, write_config

    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    deep = tmp_path / "deep.jsonl"
    call = {"type": "function", "function": {"name": "f", "arguments": "[" * 10_000 + "]" * 10_000}}
    deep.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [
        [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]},
         {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}],
        *([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(40))]))
    config_fifo = tmp_path / "fifo.yaml"
    os.mkfifo(config_fifo)

    def one_line(code: int) -> str:
        said = capsys.readouterr()
        assert code == 2 and "Traceback" not in said.out + said.err
        (line,) = [line for line in (said.out + said.err).splitlines() if "error:" in line]
        return line

    fifo_cfg = write_config(tmp_path / "fifo-run.yaml", tiny_dir, tmp_path / "out", data={"train_files": [str(fifo)]})
    for entry in (lambda: run_in_process(fifo_cfg, entry="run"), lambda: launch.run(["loop/train.py", str(fifo_cfg)]),
                  lambda: _tool("inspect_data").main([str(fifo_cfg)])):
        assert one_line(entry()).endswith(f"error: {fifo} is a named pipe (FIFO), not a file")
    assert one_line(run_in_process(config_fifo, entry="run")).endswith(
        f"error: config file {config_fifo} is a named pipe (FIFO), not a file")
    deep_cfg = write_config(tmp_path / "deep-run.yaml", tiny_dir, tmp_path / "out",
                            data={"train_files": [str(deep)], "cache_dir": str(tmp_path / "cache")})
    assert run_in_process(deep_cfg, entry="run") == 2
    said = capsys.readouterr().out
    assert f"{deep}:1: turn 1: the call to 'f': arguments are not valid JSON (nested too deeply" in said
    assert launch.check([str(deep_cfg), "--on_bad_record", "skip"]).data.on_bad_record == "skip"
    assert _tool("inspect_data").main([str(deep_cfg), "--on_bad_record", "skip", "--examples", "0"]) == 0
    assert "bad_arguments" in capsys.readouterr().out


def test_generate_says_a_fifo_given_as_its_tools_or_prompts_file_in_one_line(tmp_path, capsys):
    import argparse

    fifo = tmp_path / "tools.json"
    os.mkfifo(fifo)
    generate = _tool("generate")
    for call, said in ((lambda: generate.offered(fifo), f"--tools {fifo} is a named pipe (FIFO), not a file"),
                       (lambda: generate.questions(argparse.Namespace(held_out=None, prompts_file=fifo)),
                        f"--prompts-file {fifo} is a named pipe (FIFO), not a file")):
        with pytest.raises(SystemExit) as stopped:
            call()
        assert stopped.value.code == 2 and said in capsys.readouterr().err
