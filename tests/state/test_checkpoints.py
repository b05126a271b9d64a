"""Crash, preemption and resume under real 2-process ZeRO-3, and (where the property is the engine's: resume after
kill -9, on another number of processes, the engine named on refusal) under FSDP2."""

import json
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from loop import config as config_mod
from loop.engine.zero3_files import SHARDS
from loop.state import checkpoints, integrity
from loop.state.progress import LoopState
from tests.conftest import ROOT, free_port, launch, run_in_process, scalars, write_config
from tests.state.conftest import STEPS, config  # with the fixtures small_data and fsdp2_reference, shared there


def start(cfg: Path, *overrides: str, engine: str = "zero3") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / f"cpu_{engine}.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "loop" / "train.py"), str(cfg), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(*paths: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Return as soon as any of `paths` exists (polling every 10 ms)."""
    deadline = time.time() + timeout
    while not any(p.exists() for p in paths):
        assert proc.poll() is None, f"run ended before {paths} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{paths} never appeared"
        time.sleep(0.01)


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]


def last_values(run: Path, tag: str) -> dict[int, float]:
    return dict(scalars(run)[tag])  # later events of a step overwrite earlier ones


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_dir, small_data, tmp_path_factory):
    """The uninterrupted run; `latest` with no checkpoint yet starts it fresh (a first SLURM run)."""
    tmp = tmp_path_factory.mktemp("ref")
    launch(config(tmp, tiny_dir, small_data, tmp / "ref"), "--resume_from_checkpoint", "latest")
    assert "no complete checkpoint" in (tmp / "ref" / "train.log").read_text()
    return tmp / "ref"


ENGINE_RUNS = {"zero3": "reference", "fsdp2": "fsdp2_reference"}


@pytest.mark.parametrize("engine,kill_when", [("zero3", "after_first_checkpoint"),
                                              ("zero3", "during_second_checkpoint"),
                                              ("fsdp2", "after_first_checkpoint")])
def test_sigkill_then_resume_is_bit_identical(request, tiny_dir, small_data, tmp_path, engine, kill_when):
    """Under each engine (FSDP2 once: the moment of the kill is the loop's, not the engine's, and ZeRO-3 covers
    both moments)."""
    reference = request.getfixturevalue(ENGINE_RUNS[engine])
    out = tmp_path / "run"
    cfg = config(tmp_path, tiny_dir, small_data, out)
    proc = start(cfg, engine=engine)
    ckpts = out / "checkpoints"
    if kill_when == "after_first_checkpoint":  # dies inside epoch 0; the resumed run crosses into epoch 1
        wait_for(ckpts / "step_00000003" / checkpoints.MARKER, proc=proc)
    else:  # dies while step 6's checkpoint (the epoch boundary) is being written, or just after
        wait_for(ckpts / ".tmp-step_00000006", ckpts / "step_00000006", proc=proc)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.kill()  # the launcher starts workers in sessions of their own: kill each
    proc.wait()
    latest = checkpoints.find("latest", ckpts)
    assert latest.name in ("step_00000003", "step_00000006")
    resumed_from = int(latest.name.split("_")[1])

    launch(cfg, "--resume_from_checkpoint", "latest", accelerate_config=f"cpu_{engine}.yaml")
    assert f"resumed from {latest}" in (out / "train.log").read_text()
    ref_w, run_w = final_weights(reference), final_weights(out)
    assert ref_w.keys() == run_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], run_w[k]), k
    ref_loss, run_loss = last_values(reference, "train/loss"), last_values(out, "train/loss")
    assert [run_loss[s] for s in range(resumed_from + 1, STEPS + 1)] == \
           [ref_loss[s] for s in range(resumed_from + 1, STEPS + 1)]
    state = json.loads((ckpts / f"step_{STEPS:08d}" / checkpoints.STATE_FILE).read_text())
    ref_state = json.loads((reference / "checkpoints" / f"step_{STEPS:08d}" / checkpoints.STATE_FILE).read_text())
    assert state == ref_state  # token and sample counters continue exactly
    assert_as_the_first_run_wrote_it(ckpts / f"step_{STEPS:08d}", reference / "checkpoints" / f"step_{STEPS:08d}",
                                     tmp_path)


def assert_as_the_first_run_wrote_it(ckpt: Path, first: Path, tmp_path: Path) -> None:
    """A checkpoint written after a resume holds, file for file, the bytes the uninterrupted run wrote (their
    digests; only run_config.yaml names another output_dir), DeepSpeed's files in torch's zip format (the
    safe checkpoint engine keeps DeepSpeed's config, issue 25), and it consolidates and generates."""
    from tools import consolidate_checkpoint, generate

    ours, theirs = integrity.read_manifest(ckpt), integrity.read_manifest(first)
    assert set(ours) == set(theirs)
    assert [n for n in theirs if ours[n] != theirs[n]] == ["run_config.yaml"]
    assert all(zipfile.is_zipfile(f) for f in (ckpt / SHARDS).glob("*.pt"))
    assert consolidate_checkpoint.main([str(ckpt), str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert generate.main([str(ckpt), "--max-new-tokens", "2", "--out", str(tmp_path / "answers.md")]) == 0
    assert (tmp_path / "answers.md").read_text().count("## ") == len(generate.BUILT_IN_PROMPTS)


EASY = str(ROOT / "loop" / "evaluation" / "data" / "easy.jsonl")


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_preemption_signal_checkpoints_and_exits_with_distinct_code(tiny_dir, small_data, tmp_path, engine):
    """SIGTERM (what SLURM and Kubernetes send); SIGUSR1 takes the same path (tests/state/test_preemption.py), and
    through the README's launch command too (tests/test_launch.py). Each run also scores code before its first
    step: generation with every process joining, and the sandbox, under that engine. Under ZeRO-3 every row is
    split over both processes (sequence parallelism): generation runs whole prompts on each process all the
    same, and the preempted run's checkpoint is whole (ZeRO-3 without the split is preempted in those tests)."""
    out = tmp_path / "run"
    scored = ["--evaluation.tasks", EASY, "--evaluation.limit", "2", "--evaluation.max_answer_tokens", "8",
              "--evaluation.batch_size", "2"]
    split = ["--parallelism.sequence_parallel_size", "2", "--gradient_accumulation_steps", "4"] \
        if engine == "zero3" else []
    proc = start(config(tmp_path, tiny_dir, small_data, out), "--save_every", "100000", "--max_steps", "100000",
                 *scored, *split, engine=engine)
    wait_for(out / "train.log", proc=proc)  # trackers start before it, so it is the later
    while "train/loss" not in (out / "train.log").read_text():  # some steps are done
        assert proc.poll() is None and time.sleep(0.05) is None
    for w in workers(proc):
        w.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, log[-2000:]
    assert "exitcode  : 75" in log, log[-3000:]  # the launcher reports each worker's exit code
    found = checkpoints.complete_checkpoints(out / "checkpoints")
    assert len(found) == 1 and 0 < int(found[0].name.split("_")[1]) < 100000, found
    assert "preempted" in (out / "train.log").read_text()
    assert integrity.problems(found[0]) == []  # the signal's checkpoint verifies under either engine
    assert "step 0: easy pass@1 " in (out / "train.log").read_text()


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_ctrl_c_checkpoints_says_how_to_resume_and_exits_130(tiny_dir, small_data, tmp_path, engine):
    """A terminal's Ctrl-C reaches the launcher (the workers run in sessions of their own), which passes SIGINT
    on to every worker: they finish the step, save together and exit 130, with no traceback."""
    out = tmp_path / "run"
    proc = start(config(tmp_path, tiny_dir, small_data, out), "--save_every", "100000", "--max_steps", "100000",
                 engine=engine)
    wait_for(out / "train.log", proc=proc)
    while "train/loss" not in (out / "train.log").read_text():
        assert proc.poll() is None and time.sleep(0.05) is None
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, log[-3000:]
    found = checkpoints.complete_checkpoints(out / "checkpoints")
    assert len(found) == 1, found
    said = (out / "train.log").read_text()
    assert f"interrupted (signal SIGINT) at step {found[0].name.split('_')[1].lstrip('0')}; saved {found[0]}; " \
           "resume with --resume_from_checkpoint latest" in said, said[-2000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]


@pytest.fixture(scope="module")
def one_process(tiny_dir, small_data, tmp_path_factory) -> Path:
    """`reference` on one ZeRO-3 process with 4 accumulation steps instead of 2 processes with 2: the same rows
    in every step."""
    tmp = tmp_path_factory.mktemp("one")
    launch(config(tmp, tiny_dir, small_data, tmp / "one"), "--gradient_accumulation_steps", "4", nproc=1)
    return tmp / "one"


LOSS_TOLERANCE = 2e-3  # bf16 weights: the other layout sums the same gradients in another order


@pytest.mark.parametrize("written,resumed", [(2, 1), (1, 2)], ids=["2 -> 1", "1 -> 2"])
def test_a_checkpoint_resumes_on_another_number_of_processes_as_if_uninterrupted(request, tiny_dir, small_data,
                                                                                 tmp_path, written, resumed):
    """A ZeRO-3 checkpoint of step 6 written by `written` processes resumed by `resumed` (about half a minute a
    launch): its shards re-partitioned in a copy beside it, the accumulation steps set so that each step trains
    on the same rows, and the losses of steps 7-10 those of the uninterrupted run; the verified checkpoint
    unchanged, and the one written after the resume consolidates and verifies."""
    from tools import consolidate_checkpoint

    run = request.getfixturevalue("reference" if written == 2 else "one_process")
    other = request.getfixturevalue("one_process" if written == 2 else "reference")
    accumulation = 4 // written  # as that run was launched
    source, out = run / "checkpoints" / "step_00000006", tmp_path / "run"
    ckpts = out / "checkpoints"
    shutil.copytree(source, ckpts / source.name)
    verified = integrity.read_manifest(ckpts / source.name)
    launch(config(tmp_path, tiny_dir, small_data, out), "--gradient_accumulation_steps", str(accumulation),
           "--resume_from_checkpoint", "latest", nproc=resumed)
    said = (out / "train.log").read_text()
    assert f"accumulation steps set to {4 // resumed} (from {accumulation})" in said, said[-3000:]
    ran, uninterrupted, other_layout = (last_values(r, "train/loss") for r in (out, run, other))
    assert sorted(ran) == list(range(7, STEPS + 1))
    for s in range(1, STEPS + 1):  # the two layouts agree from the start, as the issue measured
        assert other_layout[s] == pytest.approx(uninterrupted[s], abs=LOSS_TOLERANCE), s
    for s in ran:
        assert ran[s] == pytest.approx(uninterrupted[s], abs=LOSS_TOLERANCE), (s, ran[s], uninterrupted[s])
    assert integrity.read_manifest(ckpts / source.name) == verified and integrity.problems(ckpts / source.name) == []
    assert not list(ckpts.glob(f"{checkpoints.RESHARDED}*"))  # the copy is gone once loaded
    after = json.loads((ckpts / "step_00000009" / checkpoints.STATE_FILE).read_text())
    first = json.loads((run / "checkpoints" / "step_00000009" / checkpoints.STATE_FILE).read_text())
    assert after == first | {"world_size": resumed}  # token and sample counters continue exactly
    assert yaml.safe_load((ckpts / "step_00000009" / "run_config.yaml").read_text())["training"][
        "gradient_accumulation_steps"] == 4 // resumed
    assert consolidate_checkpoint.main([str(ckpts / "step_00000009"), str(tmp_path / "model"), "--verify"]) == 0


def test_an_fsdp2_checkpoint_resumes_on_one_process_and_back_on_two(fsdp2_reference, tiny_dir, small_data, tmp_path):
    """DCP reshards on load: the 2-process FSDP2 checkpoint of step 6 resumed by 1 process (4 accumulation steps),
    and that run's checkpoint of step 9 resumed by 2 processes (two short launches, about half a minute each);
    every loss is the uninterrupted run's, the checkpoints stay verified, and the last one consolidates and
    verifies."""
    from tools import consolidate_checkpoint

    uninterrupted = last_values(fsdp2_reference, "train/loss")
    source = fsdp2_reference / "checkpoints" / "step_00000006"
    for processes, first in ((1, 7), (2, 10)):
        out = tmp_path / f"on{processes}"
        shutil.copytree(source, out / "checkpoints" / source.name)
        launch(config(tmp_path, tiny_dir, small_data, out), "--resume_from_checkpoint", "latest", nproc=processes,
               accelerate_config="cpu_fsdp2.yaml")
        said = (out / "train.log").read_text()
        assert f"accumulation steps set to {4 // processes} (from {4 // (3 - processes)})" in said, said[-3000:]
        ran = last_values(out, "train/loss")
        assert sorted(ran) == list(range(first, STEPS + 1))
        for s in ran:
            assert ran[s] == pytest.approx(uninterrupted[s], abs=LOSS_TOLERANCE), (processes, s, ran[s], uninterrupted)
        assert integrity.problems(out / "checkpoints" / source.name) == []
        assert not list((out / "checkpoints").glob(f"{checkpoints.RESHARDED}*"))
        source = out / "checkpoints" / "step_00000009"
    last = tmp_path / "on2" / "checkpoints" / f"step_{STEPS:08d}"
    assert json.loads((last / checkpoints.STATE_FILE).read_text())["world_size"] == 2
    assert consolidate_checkpoint.main([str(last), str(tmp_path / "model"), "--verify"]) == 0


def test_failed_write_leaves_the_previous_checkpoint_intact(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """Disk full in the middle of a save: a clear error, the previous checkpoint still the latest."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM


    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    cfg = config_mod.Config()
    root = tmp_path / "checkpoints"
    first = checkpoints.save(accelerator, LoopState(step=1), cfg, root, model, tokenizer)

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])  # half-written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(checkpoints.CheckpointError, match="no space left on device at .*previous checkpoint is untouc"):
        checkpoints.save(accelerator, LoopState(step=2), cfg, root, model, tokenizer)

    def torch_writer_full(obj, f, *args, **kwargs):  # what torch says when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/3: unexpected pos 5401856 vs 5401744")

    monkeypatch.setattr(torch, "save", torch_writer_full)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(checkpoints.CheckpointError, match=r"no space left on device at .* \(0 MB free\)"):
        checkpoints.save(accelerator, LoopState(step=2), cfg, root, model, tokenizer)
    monkeypatch.undo()
    assert checkpoints.find("latest", root) == first
    assert not list(root.glob(".tmp-*")) and not (root / "step_00000002").exists()
    accelerator.load_state(str(first))  # still loads

    (tmp_path / "blocked").write_text("a file where the checkpoint folder should go")
    with pytest.raises(checkpoints.CheckpointError, match="cannot create"):
        checkpoints.save(accelerator, LoopState(step=3), cfg, tmp_path / "blocked" / "ck", model, tokenizer)


def test_checkpoint_missing_a_process_files_is_never_marked_complete(tiny_dir, tokenizer, tmp_path, monkeypatch):
    """As when nodes do not share the output directory: a rank's files never arrive."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM


    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(AutoModelForCausalLM.from_pretrained(tiny_dir / "model"))
    monkeypatch.setattr(accelerator, "save_state", lambda path: Path(path).mkdir(exist_ok=True))
    monkeypatch.setattr(checkpoints.integrity, "save_rng", lambda folder, rank: None)
    with pytest.raises(checkpoints.CheckpointError, match="rng_state_0.safetensors"):
        checkpoints.save(accelerator, LoopState(step=1), config_mod.Config(), tmp_path, model, tokenizer)
    assert checkpoints.complete_checkpoints(tmp_path) == [] and not list(tmp_path.glob(".tmp-*"))


def test_a_full_disk_is_said_once_in_the_console_and_the_log(tiny_dir, tmp_path, monkeypatch, capsys):
    from tests.conftest import run_in_process

    real_save = torch.save
    saves = []

    def full_on_the_second_checkpoint(obj, f, *args, **kwargs):
        saves.append(f)
        if "step_00000004" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_the_second_checkpoint)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"max_steps": 6, "save_every": 2})
    assert run_in_process(cfg, entry="run") == 1
    console = capsys.readouterr().out
    log = (tmp_path / "out" / "train.log").read_text()
    for text in (console, log):
        assert text.count("no space left on device at") == 1 and "Traceback" not in text
    assert "the next one may not fit" in log  # warned before the save, from the last checkpoint's size
    assert checkpoints.find("latest", tmp_path / "out" / "checkpoints").name == "step_00000002"


def test_a_run_resumed_at_its_last_step_still_reports_its_eval_loss(tiny_dir, tmp_path):
    from tests.conftest import run_in_process

    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"max_steps": 2, "save_every": 2})
    assert run_in_process(cfg) == 0
    assert run_in_process(cfg, "--resume_from_checkpoint", "latest") == 0
    card = (tmp_path / "out" / "final" / "README.md").read_text()
    assert "final eval loss: nan" not in card and "not measured" not in card.split("final eval loss:")[1][:20]


def test_checkpoint_folders_without_a_complete_one_are_named_in_a_warning(single_process_run, tiny_dir, tmp_path):
    """Every COMPLETE deleted, and a save that never finished: `latest` starts from step 0, and says what it found."""
    out = tmp_path / "out"
    shutil.copytree(single_process_run / "checkpoints", out / "checkpoints")
    for marker in (out / "checkpoints").glob(f"*/{checkpoints.MARKER}"):
        marker.unlink()
    (out / "checkpoints" / ".tmp-step_00000006").mkdir()
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, out,
                       training={"max_steps": 1, "save_every": 2, "keep_last": 5, "eval_every": 0})
    assert run_in_process(cfg, "--resume_from_checkpoint", "latest") == 0
    log = (out / "train.log").read_text()
    assert (f"WARNING --resume_from_checkpoint latest: no complete checkpoint under {out / 'checkpoints'}, only "
            "step_00000002 (no COMPLETE file), step_00000004 (no COMPLETE file), .tmp-step_00000006 (a save that never "
            "finished); starting fresh from step 0") in log
