"""Launching for a scheduler: the README's command exits 75 on preemption, refuses a bad run before
launching, and workers stop when their launcher dies."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from loop.state import checkpoints
from tests.conftest import ROOT, free_port, write_config


def config(tmp_path, tiny_dir):
    return write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                        training={"max_steps": 100_000, "save_every": 100_000, "log_every": 1})


def command(cfg, *front):
    return [*front, "--config_file", str(ROOT / "accelerate_configs" / "cpu_zero3.yaml"), "--main_process_port",
            str(free_port()), "loop/train.py", str(cfg), "--resume_from_checkpoint", "latest"]


def training(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]


def wait_for_steps(out, proc, timeout=300):
    deadline = time.time() + timeout
    while not (out / "train.log").exists() or "train/loss" not in (out / "train.log").read_text():
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else ""
        assert time.time() < deadline
        time.sleep(0.2)


def test_the_readme_launch_exits_75_on_preemption_and_resumes(tiny_dir, tmp_path):
    """As SLURM's --signal=USR1@300 does: the signal reaches the launch, the workers checkpoint together,
    and the launch, not only its workers, exits 75; run again, it resumes."""
    cfg = config(tmp_path, tiny_dir)
    proc = subprocess.Popen(command(cfg, sys.executable, "tools/launch.py"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_steps(tmp_path / "out", proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    saved = checkpoints.complete_checkpoints(tmp_path / "out" / "checkpoints")
    assert len(saved) == 1
    last = int(saved[0].name.split("_")[1]) + 1
    again = subprocess.run(command(cfg, sys.executable, "tools/launch.py") + ["--max_steps", str(last)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    log = (tmp_path / "out" / "train.log").read_text()
    assert f"resumed from {saved[0]}" in log and "training.max_steps: 100000 -> " in log  # a harmless change, said


def test_a_bad_run_is_refused_before_anything_starts(tiny_dir, tmp_path):
    cfg = config(tmp_path, tiny_dir)
    proc = subprocess.run(command(cfg, sys.executable, "tools/launch.py") + ["--seq_len", "5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: data.seq_len: must be >= 16, got 5"
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "out").exists()


def test_workers_stop_when_their_launcher_dies(tiny_dir, tmp_path):
    """Killing the launcher's process group (each worker has a group of its own) used to leave them
    training; now they checkpoint and exit."""
    cfg = config(tmp_path, tiny_dir)
    proc = subprocess.Popen(command(cfg, sys.executable, "-m", "accelerate.commands.launch"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_steps(tmp_path / "out", proc)
    workers = training(proc)
    assert len(workers) == 2
    proc.kill()  # the launcher only, with SIGKILL: it cannot pass anything on
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, [p.pid for p in alive]
    assert checkpoints.complete_checkpoints(tmp_path / "out" / "checkpoints")  # they saved on the way out


def test_a_bad_preference_pair_is_refused_before_anything_starts(tiny_dir, tmp_path):
    good = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [good, {**good, "rejected": "Hello!"}]))
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", data={"train_files": [str(pairs)]},
                       training={"objective": "dpo"})
    proc = subprocess.run(command(cfg, sys.executable, "tools/launch.py"), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and f"{pairs}:2: chosen and rejected are the same answer" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "out").exists()


def refused_launches(tiny_dir, tmp_path, round_: int) -> dict[str, subprocess.Popen]:
    """Three user errors, each in a 2-process `accelerate launch`, started side by side (load makes the race
    between the ranks' exits likelier, as on the busy machine where the line was lost)."""
    occupied = tmp_path / f"occupied{round_}"
    occupied.mkdir()
    (occupied / "train.log").write_text("an earlier run\n")
    cases = {
        "misspelt config": (tmp_path / "quickstrat.yaml", ()),
        "missing train file": (config(tmp_path, tiny_dir), ("--train_files", f"[{tmp_path / 'chatterbt.jsonl'}]")),
        "occupied output folder": (config(tmp_path, tiny_dir), ("--output_dir", str(occupied))),
    }
    return {name: subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                    str(ROOT / "accelerate_configs" / "cpu_zero3.yaml"), "--main_process_port",
                                    str(free_port()), "loop/train.py", str(cfg), *overrides],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, (cfg, overrides) in cases.items()}


@pytest.mark.slow
def test_every_user_error_under_accelerate_launch_is_said_every_time(tiny_dir, tmp_path):
    """Under torchrun the first rank to exit got the others killed, so rank 0 now and then died before printing
    the line (2 of 9 tries). Now the ranks agree before leaving: the line is printed every time, every rank exits
    2, and torchrun's failure summary, the last thing on screen, names the reason. 9 launches (3 errors, 3
    times each, three at a time), all failing before a model loads: about a minute on two CPU cores; ROUNDS=10 to
    hunt the race harder."""
    reasons = {"misspelt config": "quickstrat.yaml does not exist", "missing train file": "chatterbt.jsonl",
               "occupied output folder": "holds another run"}
    for round_ in range(int(os.environ.get('ROUNDS', 3))):
        for name, proc in refused_launches(tiny_dir, tmp_path, round_).items():
            out, _ = proc.communicate(timeout=300)
            line = next((x for x in out.splitlines() if " ERROR error: " in x), None)
            assert line is not None and reasons[name] in line, f"round {round_}, {name}: {out[-3000:]}"
            assert out.count("Traceback") == 1, out[-3000:]  # accelerate launch's own, none from the workers
            assert out.count("exitcode  : 2") == 2, out[-3000:]
            summary = out.rstrip().splitlines()[-2:]  # the root cause's traceback line, then the border
            assert summary[0].strip() == "traceback : " + line.split(" ERROR ", 1)[1], summary


@pytest.mark.slow
def test_the_launch_exits_as_the_run_did_with_its_one_line(tiny_dir, tmp_path):
    """An error only the training processes find (here: accelerate left the two processes unconnected) is the
    run's one line and its own exit code, 2, not accelerate's exit 1 and its launcher's traceback. Fails before
    a model loads."""
    cfg = config(tmp_path, tiny_dir)
    proc = subprocess.run([sys.executable, "tools/launch.py", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", str(free_port()), "loop/train.py", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(said) == 1 and "2 processes were launched but accelerate set up no distributed training" in said[0]
    assert "Traceback" not in proc.stdout + proc.stderr and "ChildFailedError" not in proc.stderr


@pytest.mark.slow
def test_the_quickstart_trains_again_into_its_folder_moving_the_earlier_run_aside(tiny_dir, tmp_path):
    """README command 1 run a second time: its train step (tools/launch.py ... --overwrite_output_dir true)
    moves the first run, with the consolidated model and answers the chain wrote, into previous-TIME/ and
    trains afresh, so consolidation and answers follow again, the last saying where the chain's time went.
    One 2-step 2-process run."""
    out = tmp_path / "out"
    earlier = ["train.log", "config.yaml", "answers.md", "consolidated/model.safetensors",
               "checkpoints/step_00000072/loop_state.json"]
    for name in earlier:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the first run\n")
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, out, training={"max_steps": 2, "save_every": 2})
    proc = subprocess.run([sys.executable, "tools/launch.py", "--config_file",
                           str(ROOT / "accelerate_configs" / "cpu_zero3.yaml"), "--main_process_port",
                           str(free_port()), "loop/train.py", str(cfg), "--overwrite_output_dir", "true"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    aside = list(out.glob("previous-*"))
    assert len(aside) == 1 and all((aside[0] / name).read_text() == "the first run\n" for name in earlier)
    assert "--overwrite_output_dir: moved the earlier run" in proc.stderr + proc.stdout
    assert (out / "final" / "model.safetensors").is_file() and not (out / "answers.md").exists()
    assert (out / "checkpoints" / "step_00000002").is_dir()
    # The rest of the chain follows, and its last step says where the time went (issue 40.5).
    assert "INFO time: data " in (out / "train.log").read_text()
    for step in (["tools/consolidate_checkpoint.py", str(out / "checkpoints"), str(out / "consolidated")],
                 ["tools/generate.py", str(out / "consolidated"), "--held-out", str(out), "--count", "2",
                  "--max-new-tokens", "4"]):
        done = subprocess.run([sys.executable, *step], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "answers.md").read_text().count("## ") == 2
    summary = done.stdout.strip().splitlines()[-1]
    phases = ["data", "model and engine start", "training", "final model", "consolidation", "answers"]
    assert summary.startswith("time: ") and summary.endswith(" s in all"), summary
    assert [part.rsplit(" ", 2)[0] for part in summary.removeprefix("time: ").split("; ")[0].split(", ")] == phases
