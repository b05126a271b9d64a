"""Code evaluation inside the run: it measures what it claims (the tiny model taught a few easy problems goes
from none to most, and tools/evaluate.py agrees on the checkpoint), it reaches trackers, train.log, the
checkpoint and the card, it runs under 2-process ZeRO-3, it is refused when the machine cannot contain it,
and the run survives hostile programs with its files intact."""

import json
import socket
import subprocess
import uuid

from huggingface_hub import ModelCard

from loop.evaluation import tasks
from loop.state import integrity
from tests.conftest import SECRET_TOKEN, run_in_process, scalars, write_config
from tests.evaluation import hostile
from tests.evaluation.test_sandbox import leftovers
from tools import evaluate


def test_pass_at_1_rises_as_the_model_learns_the_problems_and_the_tool_agrees(tiny_dir, tmp_path):
    """About 30 s on 2 quiet cores: 120 one-process steps teach the tiny model 4 solutions word for word (60
    leave it near 0.5), and it answers them before the first step and at the checkpoint of the last, then
    again from the tool (greedy, and sampled for pass@k)."""
    problems = tasks.load(str(tasks.EASY))[:4]
    (tmp_path / "easy.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": tasks.reference(p)}) + "\n"
                                                  for p in problems) * 16)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, out,
                       data={"train_files": [str(tmp_path / "train.jsonl")], "eval_fraction": 0.0, "packing": "pad"},
                       training={"max_steps": 120, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                                 "lr_schedule": "constant", "warmup_steps": 5, "save_every": 120, "log_every": 20},
                       evaluation={"tasks": str(tmp_path / "easy.jsonl"), "max_answer_tokens": 96})
    assert run_in_process(cfg) == 0
    curve = dict(scalars(out)["eval/easy/pass@1"])
    assert sorted(curve) == [0, 120] and curve[0] == 0.0 and curve[120] >= 0.5, curve
    assert {"eval/easy/generate_s", "eval/easy/execute_s"} <= set(scalars(out))  # the time it took, logged
    log = (out / "train.log").read_text()
    assert f"step 120: easy pass@1 {curve[120]:.3f} (" in log and "answers " in log and "tests " in log
    checkpoint = out / "checkpoints" / "step_00000120"
    results = [json.loads(line) for line in (checkpoint / "eval" / "easy.jsonl").open()]
    assert [r["task_id"] for r in results] == [p["task_id"] for p in problems]
    assert sum(r["passed"] for r in results) / 4 == curve[120] and all("result" in r for r in results)
    assert integrity.problems(checkpoint) == []  # the results beside it did not spoil the checkpoint
    card = ModelCard.load(out / "final" / "README.md").text
    assert f"- easy pass@1: **{curve[120]:.3f}** at step 120" in card and "each contained by bubblewrap" in card
    assert "| 0 | 0.000 |" in card and f"| 120 | {curve[120]:.3f} |" in card
    assert (out / "final" / "easy_pass_at_1.png").read_bytes()[:4] == b"\x89PNG"

    # The same checkpoint, scored by the tool: the same answers, the same verdicts.
    assert evaluate.main([str(checkpoint), "--tasks", str(tmp_path / "easy.jsonl"), "--out", str(tmp_path / "tool"),
                          "--max-answer-tokens", "96"]) == 0
    again = [json.loads(line) for line in (tmp_path / "tool" / "easy.jsonl").open()]
    assert [(r["answer"], r["passed"]) for r in again] == [(r["answer"], r["passed"]) for r in results]
    assert json.loads((tmp_path / "tool" / "easy.json").read_text())["pass@1"] == curve[120]
    # pass@k from sampled answers: 3 samples a problem give pass@1 only
    assert evaluate.main([str(checkpoint), "--tasks", str(tmp_path / "easy.jsonl"), "--out", str(tmp_path / "k"),
                          "--limit", "2", "--samples-per-task", "3", "--temperature", "0.8",
                          "--max-answer-tokens", "32"]) == 0
    sampled = json.loads((tmp_path / "k" / "easy.json").read_text())
    assert sampled["samples"] == 6 and "pass@1" in sampled and "pass@10" not in sampled


def test_the_run_survives_hostile_programs_with_its_files_intact(tiny_dir, tmp_path):
    """The problems' own tests are the hostile programs (a user's problems file can hold anything); the model's
    answer lands inside a string literal, so that whatever it writes, the hostile code runs."""
    out = tmp_path / "out"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    bystander = subprocess.Popen(["sleep", "600"])
    (tmp_path / "secret").write_text(SECRET_TOKEN)
    programs = hostile.programs(out, out / "checkpoints" / "step_00000001", tmp_path / "secret",
                                listener.getsockname()[1], bystander.pid, uuid.uuid4().hex)
    problems = [{"task_id": f"hostile/{name}", "prompt": code + '_ = r"""\n', "entry_point": "len",
                 "canonical_solution": "", "test": '"""\ndef check(candidate):\n    pass\n'}
                for name, code in programs.items()]
    (tmp_path / "hostile.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, out,
                       training={"max_steps": 2, "save_every": 1, "log_every": 1},
                       evaluation={"tasks": str(tmp_path / "hostile.jsonl"), "at_start": False, "timeout_s": 1.0,
                                   "max_answer_tokens": 4, "memory_mb": 256})
    try:
        assert run_in_process(cfg) == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        listener.close()
    for step in (1, 2):
        checkpoint = out / "checkpoints" / f"step_{step:08d}"
        assert (checkpoint / "COMPLETE").is_file() and integrity.problems(checkpoint) == []
    verdicts = {json.loads(line)["task_id"]: json.loads(line)["result"]
                for line in (out / "checkpoints" / "step_00000002" / "eval" / "hostile.jsonl").open()}
    assert verdicts["hostile/fork bomb"] == "timed out" and verdicts["hostile/read secrets"] == "passed"
    assert verdicts["hostile/delete the checkpoint"].startswith("failed: [Errno 2] No such file or directory")
    assert verdicts["hostile/writes"] == "passed"  # it asserts that only its own /tmp took a write
    assert not (out / "pwned").exists() and "step 2: hostile pass@1" in (out / "train.log").read_text()
    assert (out / "final" / "model.safetensors").is_file()
    assert leftovers() == []
    assert not any(SECRET_TOKEN.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_without_bubblewrap_the_run_is_refused_before_it_starts(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", evaluation={"tasks": str(tasks.EASY)})
    assert run_in_process(cfg, entry="run") == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "apt-get install bubblewrap" in errors[0], errors
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_zero3_run_scores_with_every_process_and_gathers_in_order(trained_run):
    """The shared 2-process ZeRO-3 run evaluates 3 easy problems at steps 0, 8 and 16: every process answers
    its share (padded to the same count, since every forward pass needs all of them), and the main process
    writes them all, in problem order, without the padding."""
    curve = dict(scalars(trained_run)["eval/easy/pass@1"])
    assert sorted(curve) == [0, 8, 16]
    for step in (8, 16):
        folder = trained_run / "checkpoints" / f"step_{step:08d}" / "eval"
        results = [json.loads(line) for line in (folder / "easy.jsonl").open()]
        assert [r["task_id"] for r in results] == ["easy/0", "easy/1", "easy/2"]
        assert json.loads((folder / "easy.json").read_text())["step"] == step
    history = [json.loads(line) for line in (trained_run / "eval" / "easy.history.jsonl").open()]
    assert [h["step"] for h in history] == [0, 8, 16]
    assert "easy pass@1" in (trained_run / "final" / "README.md").read_text()
