"""`loop/train.py --help`: every config key, grouped by section, with its default and the comment that
explains it, read from the dataclasses of loop/config/settings.py (the one place they are written)."""

from __future__ import annotations

import dataclasses
import inspect
import typing

from loop.config.parse import ALIASES
from loop.config.settings import Config, DataSource

HEAD = """usage: accelerate launch [--config_file ...] loop/train.py CONFIG.yaml [--key value ...]
       python tools/launch.py [accelerate launch options] loop/train.py CONFIG.yaml [--key value ...]

Fine-tune a causal code model on dialogues with Accelerate + DeepSpeed. CONFIG.yaml holds the sections
below; any key can be overridden with --key value, --key=value or --section.key value (values read as
YAML: --train_files "[a.jsonl, b.jsonl]", --push_to_hub false). Exit codes: 0 done, 2 config or data
problem, 1 a run that cannot go on, 75 preempted (a checkpoint was written: requeue).
"""


def comments(cls: type) -> dict[str, str]:
    """Each field's comment: the lines just above it and the one at its end, as written in the source."""
    found, pending = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            pending.append(text.lstrip("# "))
        elif ":" in text and not text.startswith(('"""', "@", "def ")):
            name = text.split(":")[0].strip()
            trailing = text.split("  # ", 1)[1] if "  # " in text else ""
            found[name] = " ".join([*pending, trailing]).strip()
            pending = []
        else:
            pending = []
    return found


def fields(cls: type) -> list[str]:
    notes = comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(f"  {f.name} = {default!r}" + (f"\n      {notes[f.name]}" if notes.get(f.name) else ""))
    return out


def text() -> str:
    out = [HEAD]
    for section, cls in typing.get_type_hints(Config).items():
        out += [f"{section}:", *fields(cls), ""]
    out += ["a data.train_files / data.eval_files entry (a path, or a mapping of these keys):", *fields(DataSource), ""]
    out.append("also accepted, as people write them for TRL and the HF Trainer: "
               + ", ".join(f"{alias} ({key})" for alias, key in ALIASES.items()))
    return "\n".join(out)
