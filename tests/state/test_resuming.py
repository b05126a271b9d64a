"""Where a run starts (loop/state/resuming.py): the global batch kept on another number of processes or another
sequence-parallel size, a config that changes what a step means refused, a checkpoint of another engine refused
in one line, and a resume that cannot start writing nothing. Resume as if uninterrupted, after kill -9 and on
another number of processes, is in test_checkpoints.py, beside the runs it shares."""

import json
import shutil
from types import SimpleNamespace

import pytest

from loop import config as config_mod
from loop.state import checkpoints, integrity, resuming
from tests.conftest import launch, run_in_process, write_config


class Launched:
    """What keep_global_batch reads of an accelerator: the process count and the engine's settings."""

    def __init__(self, processes: int, deepspeed: bool = True):
        self.num_processes, self.gradient_accumulation_steps = processes, 0
        plugin = SimpleNamespace(deepspeed_config={}, zero_stage=3, set_deepspeed_weakref=lambda: None)
        self.state = SimpleNamespace(deepspeed_plugin=plugin if deepspeed else None)
        self.distributed_type = "DEEPSPEED" if deepspeed else "MULTI_CPU"


@pytest.mark.parametrize("processes,accumulation", [(1, 4), (4, 1)])
def test_the_global_batch_is_kept_on_another_number_of_processes(tiny_dir, tmp_path, processes, accumulation):
    cfg = config_mod.from_file(write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out"))  # accumulation 2
    saved, ckpt = {"training": {"gradient_accumulation_steps": 2}}, tmp_path / "step_00000006"
    assert resuming.keep_global_batch(Launched(2), cfg, saved, ckpt, 2) == []  # as many processes: as it was
    launched = Launched(processes)
    notes = resuming.keep_global_batch(launched, cfg, saved, ckpt, 2)
    assert cfg.training.gradient_accumulation_steps == launched.gradient_accumulation_steps == accumulation
    assert launched.state.deepspeed_plugin.deepspeed_config["train_batch_size"] == 2 * 2 * 2  # rows a step
    assert saved["training"]["gradient_accumulation_steps"] == accumulation  # compare() sees no change
    assert [text for _, text in notes] == [f"{ckpt} was written by 2 processes and this run has {processes}: its "
                                           "shards are re-partitioned on load, and the accumulation steps set to "
                                           f"{accumulation} (from 2) so that every step trains on the same rows"]


def test_a_global_batch_the_processes_cannot_split_or_an_engine_that_cannot_reshard_is_refused(tiny_dir, tmp_path):
    cfg = config_mod.from_file(write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out"))
    ckpt, saved = tmp_path / "step_00000006", {"training": {"gradient_accumulation_steps": 2}}
    with pytest.raises(checkpoints.CheckpointError, match=f"^{ckpt} was written by 2 processes x 2 accumulation "
                       "steps = 4 micro-batches a step, which 3 processes cannot split evenly; launch with a number "
                       "of processes that divides 4$"):
        resuming.keep_global_batch(Launched(3), cfg, saved, ckpt, 2)
    with pytest.raises(checkpoints.CheckpointError, match="resume only on as many processes as wrote them. Launch "
                       "with --num_processes 2, or turn it into a model with `python tools/consolidate_checkpoint"):
        resuming.keep_global_batch(Launched(1, deepspeed=False), cfg, saved, ckpt, 2)
    assert cfg.training.gradient_accumulation_steps == 2


def test_resume_refuses_changes_to_what_a_step_is_and_applies_the_rest(tiny_dir, tmp_path, capsys):
    """In this process (one process, no DeepSpeed): a 2-step run, then resumes with changed settings."""
    from tests.conftest import run_in_process

    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       training={"max_steps": 2, "save_every": 2, "eval_every": 0})
    assert run_in_process(cfg, entry="run") == 0
    written = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    resume = ("--resume_from_checkpoint", "latest", "--max_steps", "3")
    assert run_in_process(cfg, *resume, "--seq_len", "128", "--micro_batch_size", "3", entry="run") == 2
    said = capsys.readouterr().out
    assert "changes the data order or what a step means: data.seq_len: 256 -> 128; " \
           "training.micro_batch_size: 2 -> 3" in said and "--allow_config_change true" in said
    # Refused before anything was written: config.yaml still says 256, train.log did not grow (issue 25).
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*") if p.is_file()} == written
    (tmp_path / "extra.jsonl").write_text((tiny_dir / "data" / "chatterbot.jsonl").read_text().split("\n", 1)[1])
    other_data = ("--train_files", f"[{tmp_path / 'extra.jsonl'}]")
    assert run_in_process(cfg, *resume, *other_data, entry="run") == 2
    assert "data.train_files" in capsys.readouterr().out
    # The same file name with other dialogues in it: caught by the content's fingerprint.
    data_file = tmp_path / "data.jsonl"
    data_file.write_text((tiny_dir / "data" / "chatterbot.jsonl").read_text())
    cfg2 = write_config(tmp_path / "run2.yaml", tiny_dir, tmp_path / "out2", data={"train_files": [str(data_file)]},
                        training={"max_steps": 2, "save_every": 2, "eval_every": 0})
    assert run_in_process(cfg2, entry="run") == 0
    data_file.write_text((tmp_path / "extra.jsonl").read_text())
    assert run_in_process(cfg2, *resume, entry="run") == 2
    said = capsys.readouterr().out
    assert "the training data's content" in said and "data.train_files" not in said
    assert run_in_process(cfg, *resume, "--seq_len", "128", "--allow_config_change", "true", "--lr", "1e-3") == 0
    log = (tmp_path / "out" / "train.log").read_text()
    assert "resuming with changed settings (applied): training.lr: 0.003 -> 0.001; training.max_steps: 2 -> 3" in log
    assert "resuming with --allow_config_change despite: data.seq_len: 256 -> 128" in log
    assert "Final train loss" in (tmp_path / "out" / "final" / "README.md").read_text()


def test_a_resume_that_cannot_start_writes_nothing(tiny_dir, tmp_path):
    """A missing checkpoint path on a fresh output directory: refused before the directory exists."""
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"max_steps": 1})
    assert run_in_process(cfg, "--resume_from_checkpoint", str(tmp_path / "nowhere"), entry="run") == 1
    assert not (tmp_path / "out").exists()


ENGINES_SAID = ("was written by {saved} and this run uses {running}: a checkpoint resumes only under the engine "
                "that wrote it. Turn it into a model with `python tools/consolidate_checkpoint.py {ckpt} MODEL_DIR`")
PLAIN, DEEPSPEED = "accelerate without DeepSpeed (one process or DDP)", "DeepSpeed"


@pytest.mark.slow
def test_a_checkpoint_without_deepspeed_is_refused_by_one_zero3_process_before_anything_loads(single_process_run,
                                                                                           tiny_dir, tmp_path):
    """Both runs have one process, so the process count passes: before, DeepSpeed died inside its loader
    (`assert len(self.ckpt_list) > 0`). Launches one ZeRO-3 process (about half a minute), refused before the
    model is built and before the output directory is made."""
    ckpt = single_process_run / "checkpoints" / "step_00000004"
    assert json.loads((ckpt / "loop_state.json").read_text())["engine"] == "accelerate"
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       training={"max_steps": 4, "save_every": 2, "keep_last": 5, "eval_every": 0})
    proc = launch(cfg, "--resume_from_checkpoint", str(ckpt), nproc=1, check=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said[-3000:]
    line = f"error: {ckpt} " + ENGINES_SAID.format(saved=PLAIN, running=DEEPSPEED, ckpt=ckpt)
    assert said.count(f"ERROR {line}") == 1, said[-3000:]  # said once by the run, and named in torchrun's summary:
    assert said.count(f"traceback : {line}") == 1, said[-3000:]
    # accelerate's launcher prints its own traceback when the process exits 1; none from the run itself
    assert "ckpt_list" not in said and 'train.py", line' not in said and "model: " not in said
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine,recorded", [("zero3", True), ("zero3", False), ("fsdp2", False)],
                         ids=["recorded", "before 2026-12: by its files", "FSDP2, by its files"])
def test_a_zero3_checkpoint_is_refused_without_deepspeed_naming_both_engines(request, tiny_dir, tmp_path, capsys,
                                                                            engine, recorded):
    """The reverse, in this process: before, the checkpoint was called "unreadable, truncated or not plain data".
    A checkpoint from before the loop state named its engine is known by its files; so is an FSDP2 checkpoint
    (its DCP index), named as such."""
    from tests.state.conftest import rewrite_manifest

    run, name = (request.getfixturevalue("trained_run"), "step_00000016") if engine == "zero3" else \
        (request.getfixturevalue("fsdp2_reference"), "step_00000006")
    ckpt = tmp_path / "checkpoints" / name
    shutil.copytree(run / "checkpoints" / ckpt.name, ckpt)
    assert json.loads((ckpt / "loop_state.json").read_text())["engine"] == {"zero3": "deepspeed"}.get(engine, engine)
    if not recorded:
        state = json.loads((ckpt / "loop_state.json").read_text())
        del state["engine"]
        (ckpt / "loop_state.json").write_text(json.dumps(state))
        rewrite_manifest(ckpt, "loop_state.json")
        assert integrity.problems(ckpt) == []
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"max_steps": 2})
    assert run_in_process(cfg, "--resume_from_checkpoint", str(ckpt), entry="run") == 1
    said = capsys.readouterr()
    said = said.out + said.err
    saved = {"zero3": DEEPSPEED, "fsdp2": "FSDP2"}[engine]
    assert said.count(ENGINES_SAID.format(saved=saved, running=PLAIN, ckpt=ckpt)) == 1, said[-3000:]
    assert "not plain data" not in said and "Traceback" not in said and not (tmp_path / "out").exists()


def test_the_global_batch_is_kept_when_the_sequence_parallel_size_changes(tiny_dir, tmp_path):
    """Written by 4 processes sharing rows in pairs (2 data-parallel groups x 2 accumulation steps): resumed on 4
    processes without the split (4 groups) the accumulation goes to 1, on 2 processes with it (1 group) to 4; the
    shards are re-partitioned only where the process count changed."""
    saved = lambda: {"training": {"gradient_accumulation_steps": 2},  # noqa: E731
                     "parallelism": {"sequence_parallel_size": 2}}
    ckpt = tmp_path / "step_00000006"
    for processes, size, accumulation, shards in ((4, 1, 1, False), (2, 2, 4, True), (4, 2, 2, None)):
        cfg = config_mod.from_file(write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                                                parallelism={"sequence_parallel_size": size}))
        notes = resuming.keep_global_batch(Launched(processes), cfg, saved(), ckpt, 4)
        assert cfg.training.gradient_accumulation_steps == accumulation
        if shards is None:
            assert notes == []
            continue
        (text,) = [t for _, t in notes]
        assert text.startswith(f"{ckpt} was written by 4 processes (2 data-parallel groups of 2) and this run has ")
        assert ("its shards are re-partitioned on load" in text) == shards
        assert text.endswith(f"the accumulation steps set to {accumulation} (from 2) so that every step trains on "
                             "the same rows")
