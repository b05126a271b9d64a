"""The output directory: one run at a time, and nothing written by a run that is refused."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loop.state import checkpoints, integrity, rundir
from tests.conftest import ROOT, free_port, run_in_process, write_config


def small_run(tmp_path, tiny_dir, **training):
    return write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                        training={"max_steps": 4, "save_every": 2, "keep_last": 5, **training})


def test_a_second_run_on_the_same_directory_is_refused_naming_the_first(tiny_dir, tmp_path, capsys):
    cfg = small_run(tmp_path, tiny_dir, max_steps=100_000, save_every=100_000)
    first = subprocess.Popen([sys.executable, "loop/train.py", str(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while not (tmp_path / "out" / "train.log").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        assert run_in_process(cfg, entry="run") == 2
        said = capsys.readouterr()
        assert f"in use by another run (pid {first.pid} on {socket.gethostname()}" in said.out + said.err
    finally:
        first.kill()
        first.wait()
    # Its lock file stays, but nobody holds it any more: the next run takes it over and says so.
    assert run_in_process(cfg, "--max_steps", "2", "--overwrite_output_dir", "true", entry="run") == 0
    assert f"took over the lock of a run that is gone (pid {first.pid}" in (tmp_path / "out" / "train.log").read_text()


def test_a_fresh_run_never_writes_over_another_and_overwrite_moves_it_aside(tiny_dir, tmp_path, capsys):
    """Issue 28.1: the README's command run twice must not mix (or prune) the first run's checkpoints, model
    and logs; it is refused with the two ways on, and --overwrite_output_dir keeps the first run intact."""
    cfg, out = small_run(tmp_path, tiny_dir), tmp_path / "out"
    assert run_in_process(cfg, entry="run") == 0
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    kept = {k: v for k, v in before.items() if k.name != rundir.LOCK}  # the lock stays where it is

    assert run_in_process(cfg, "--max_steps", "2", entry="run") == 2
    said = capsys.readouterr()
    (line,) = [line for line in (said.out + said.err).splitlines() if "error:" in line]
    assert f"output.output_dir {out} holds another run (checkpoints/ (step_00000002, step_00000004), " \
           "config.yaml, final/" in line, line
    assert "--resume_from_checkpoint latest" in line and "--overwrite_output_dir true" in line
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before

    assert run_in_process(cfg, "--max_steps", "2", "--keep_last", "1", "--overwrite_output_dir", "true",
                          entry="run") == 0
    (aside,) = out.glob(f"{rundir.ASIDE}*")
    assert {p.relative_to(aside): p.stat().st_mtime_ns for p in aside.rglob("*") if p.is_file()} == kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert "moved the earlier run (checkpoints/ (step_00000002, step_00000004), config.yaml, final/" in \
        (out / "train.log").read_text()
    assert run_in_process(cfg, "--overwrite_output_dir", "true", "--resume_from_checkpoint", "latest",
                          entry="run") == 2  # it would move aside what it resumes
    assert "cannot be combined with output.resume_from_checkpoint" in capsys.readouterr().out
    assert checkpoints.run_of(out / "checkpoints" / "step_00000002") not in ("", checkpoints.run_of(
        aside / "checkpoints" / "step_00000002"))


def test_pruning_removes_only_the_checkpoints_of_the_run_that_writes(tmp_path):
    root = tmp_path / "checkpoints"
    for step, run in [(1, "a"), (2, "a"), (3, ""), (4, "b"), (5, "b"), (6, "b")]:
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / integrity.MARKER).write_text(f"step {step}\n" + (f"run {run}\n" if run else ""))
    checkpoints.prune(root, 1, "b")
    assert [p.name for p in checkpoints.complete_checkpoints(root)] == \
        ["step_00000001", "step_00000002", "step_00000003", "step_00000006"]
    checkpoints.prune(root, 1, "")  # checkpoints from before runs had ids are a run of their own
    assert len(checkpoints.complete_checkpoints(root)) == 4


@pytest.mark.parametrize("problem, said", [
    ({"data": {"train_files": ["tests/fixtures/malformed/messages.jsonl"]}}, "14 bad record(s)"),
    ({"data": {"train_files": ["data/not-there.jsonl"]}}, "not found: data/not-there.jsonl"),
    ({"model": {"name_or_path": "./models/missing-model"}}, "model.name_or_path: not found: ./models/missing-model"),
    ({"model": {"name_or_path": "someone/missing-model"}}, "(not found locally, so it was read as a Hub model id)"),
    ({"training": {"lrr": 1}}, "training.lrr: unknown key"),
])
def test_config_and_data_errors_are_one_line_exit_2_and_write_nothing(tiny_dir, tmp_path, capsys, problem, said):
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out")
    raw = yaml.safe_load(cfg.read_text())
    for section, values in problem.items():
        raw[section].update(values)
    cfg.write_text(yaml.safe_dump(raw))
    assert run_in_process(cfg, entry="run") == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert said in text and "Traceback" not in text and text.count("error:") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["an existing file", "a read-only file system", "below a file"])
def test_an_output_directory_that_cannot_be_written_is_one_line_before_any_work(tiny_dir, tmp_path, small_disk,
                                                                                capsys, where):
    """Said before the data is read, exit 2, and nothing written (issue 25: an OSError after data preparation)."""
    out = {"an existing file": tmp_path / "out", "below a file": tmp_path / "out" / "run",
           "a read-only file system": None}[where]
    if out is None:
        out = small_disk(read_only=True) / "run"
    else:
        (tmp_path / "out").write_text("a file\n")
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, out)
    assert run_in_process(cfg, entry="run") == 2
    said = capsys.readouterr().out
    (line,) = [line for line in said.splitlines() if "error:" in line]
    assert "output.output_dir: " in line and ("not writable" if "read-only" in where else "is a file") in line
    assert "Traceback" not in said and " data: " not in said
    if where == "a read-only file system":
        assert not out.exists()
    else:
        assert (tmp_path / "out").read_text() == "a file\n"  # untouched


def test_an_empty_training_set_is_an_error_before_any_model_work(tiny_dir, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    for extra in ((), ("--max_steps", "0", "--num_epochs", "1")):
        cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                           data={"train_files": [str(tmp_path / "empty.jsonl")], "eval_fraction": 0.0})
        assert run_in_process(cfg, *extra, entry="run") == 2
        assert "no training dialogues in" in capsys.readouterr().out
        assert not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, "tools/inspect_data.py", str(cfg)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no training dialogues" in proc.stderr


def test_lock_file_names_the_holder_and_a_run_that_ended_leaves_no_name(tmp_path):
    with rundir.claimed(tmp_path / "d", is_main=True) as took_over:
        holder = (tmp_path / "d" / rundir.LOCK).read_text()
        assert holder.startswith(f"pid {os.getpid()} on {socket.gethostname()}") and took_over is None
    assert json.dumps(holder)  # plain text a person can read
    assert not (tmp_path / "d" / rundir.LOCK).exists()  # a finished run leaves no empty lock file behind
    with rundir.claimed(tmp_path / "d", is_main=True) as took_over:  # the next run (a resume, say)
        assert took_over is None  # no warning about a run that is gone: the last one ended


def hold_lock(lock: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds `lock` for `seconds` (as a killed run's process does while the kernel ends
    it) and says when it has it."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(float(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_requeue_waits_for_the_lock_of_a_killed_run_but_not_for_a_live_one(tmp_path):
    """The CI failure of 2026-12-07: a kill -9 and an immediate resume, refused because the killed process had
    not finished exiting. A holder named in the lock that is gone is waited for; a live one is refused at once."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "d" / rundir.LOCK
    lock.parent.mkdir()
    lock.write_text(f"pid {gone.stdout.strip()} on {socket.gethostname()} since 2026-12-07 15:26:03\n")
    holder = hold_lock(lock, 2)
    started = time.monotonic()
    rundir.check_writable(lock.parent)
    with rundir.claimed(lock.parent, is_main=True) as took_over:
        assert f"run that is gone (pid {gone.stdout.strip()} on" in took_over
    assert 1 < time.monotonic() - started < 30 and holder.wait() == 0

    lock.write_text(f"pid {os.getpid()} on {socket.gethostname()} since 2026-12-07 15:26:03\n")  # alive
    holder, started = hold_lock(lock, 30), time.monotonic()
    try:
        with pytest.raises(rundir.DirectoryInUse, match=f"in use by another run \\(pid {os.getpid()} on"):
            rundir.check_writable(lock.parent)
        with pytest.raises(rundir.DirectoryInUse):
            with rundir.claimed(lock.parent, is_main=True):
                pass
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


def same_folder(first: Path, second: Path) -> list[str]:
    """What the two processes of tests/state/same_folder.py said, rank 0 in `first`, rank 1 in `second`."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "state" / "same_folder.py"), str(first),
                               str(second)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                                "PYTHONPATH": str(ROOT)}) for r in (0, 1)]
    said = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err[-3000:] for _, err in said)
    return [out for out, _ in said]


def test_processes_that_do_not_see_the_same_run_folder_are_refused_before_any_step(tmp_path):
    """Issue 39.6: rank 1 resolves the relative output directory in another working directory, as a node whose
    folder is not shared would see one of its own: both refuse in one line naming its host and rank. With one
    folder both pass. The markers are gone either way."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    (node1 / "out").mkdir(parents=True)
    node0.mkdir()
    line = (f"error: output.output_dir out is not the same folder for every process: the main process on "
            f"{socket.gethostname()} cannot see what 1 process(es) on {socket.gethostname()} (rank 1) wrote there; ")
    apart = same_folder(node0, node1)
    assert all(said.startswith(line) and said.count("\n") == 1 for said in apart), apart
    assert list((node0 / "out").iterdir()) == list((node1 / "out").iterdir()) == []
    assert same_folder(node0, node0) == ["shared\n", "shared\n"]
    assert list((node0 / "out").iterdir()) == []
