"""The objectives by the name training.objective gives them: the one place that picks one.

The config declares the names (loop/config/settings.py, `Objective`); the objective of each name is the module
loop/training/NAME.py and its `PLUGIN` (objective.py). So a new objective is its module and its name in
that list, and nothing else changes.
"""

from __future__ import annotations

import importlib
from typing import get_args

from loop.config import Config
from loop.config import Objective as Name
from loop.training.objective import Plugin

NAMES: tuple[str, ...] = get_args(Name)


def plugin(name: str) -> Plugin:
    return importlib.import_module(f"loop.training.{name}").PLUGIN


def pick(cfg: Config) -> Plugin:
    """The run's objective (the config's value is one of NAMES: checked when the config was read)."""
    return plugin(cfg.training.objective)
