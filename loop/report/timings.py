"""Where a run's time went, phase by phase, kept in OUTPUT_DIR/timings.json: the training run writes its
phases (data, model and engine start, training, final model), and the tools that carry the quickstart on add
theirs (consolidation, answers), so the chain's last step can say where all of it went in one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

FILE = "timings.json"


class Phases:
    """A stopwatch for consecutive phases: `done(name)` ends the phase under way and starts the next."""

    def __init__(self) -> None:
        self.mark = time.monotonic()
        self.spent: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.spent[name] = self.spent.get(name, 0.0) + now - self.mark
        self.mark = now


def describe(spent: dict[str, float]) -> str:
    """'time: data 12 s, training 95 s, ...; 120 s in all'."""
    each = ", ".join(f"{name} {s:.0f} s" for name, s in spent.items())
    return f"time: {each}; {sum(spent.values()):.0f} s in all"


def record(run_dir: Path, spent: dict[str, float], fresh: bool = False) -> dict[str, float]:
    """Add phases to the run's timings (a fresh run starts them over); returns all of them. A run directory
    that cannot be written keeps none: the times are a report, not the run's result."""
    path = Path(run_dir) / FILE
    try:
        earlier = {} if fresh or not path.is_file() else json.loads(path.read_text())
    except ValueError:
        earlier = {}
    every = earlier | {name: round(s, 1) for name, s in spent.items()}
    try:
        path.write_text(json.dumps(every, indent=1) + "\n")
    except OSError:
        pass
    return every


def run_dir_of(path: Path) -> Path | None:
    """The run directory that holds `path` (a checkpoint, its checkpoints/ folder, a model folder in the run),
    found by its timings: None when there is none."""
    for folder in [Path(path), *Path(path).absolute().parents][:3]:
        if (folder / FILE).is_file():
            return folder
    return None
