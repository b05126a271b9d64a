"""Where a benchmark's figures come from, printed with them: the command, the commit, the machine, its load
before and after, and the date. A figure without these cannot be checked by whoever runs it next."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def commit() -> str:
    """The short commit, with "+changes" when the work tree differs from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    import torch

    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


@dataclass
class Said:
    command: str
    load_before: float
    started: float

    @classmethod
    def start(cls, command: list[str] | None = None) -> Said:
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        argv = command or ["python", *(["-m", spec.name] if spec else [sys.argv[0]]), *sys.argv[1:]]
        return cls(shlex.join(argv), os.getloadavg()[0], time.time())

    def line(self) -> str:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.started))
        return (f"from: `{self.command}`, commit {commit()}, {date}, {time.time() - self.started:.0f} s; "
                f"{machine()}; load average {self.load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
