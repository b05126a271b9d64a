"""Reading a run's config: YAML plus `--key value` overrides into the dataclasses of settings.py, every
value checked and every error naming its key, so a typo costs seconds, not a queued GPU job; and what a
resumed run compares with the config its checkpoint was written under."""

from __future__ import annotations

import dataclasses
import reprlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from loop.config.errors import ConfigError, did_you_mean, first_line, not_a_file
from loop.config.settings import Config, validate

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 120, 120, 3


def _shown(value: Any) -> str:
    """A value as an error message repeats it: bounded (an aliased structure can be billions of items)."""
    shown = _REPR.repr(value)
    return shown if len(shown) <= 200 else f"{shown[:197]}..."


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the dataclass field type `hint`; return it converted."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(t for t in options if t is not type(None))
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if value in allowed:
            return value
        raise ConfigError(f"{key}: {_shown(value)} is not one of {list(allowed)}{did_you_mean(value, allowed)}")
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_shown(value)}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {_shown(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {_shown(value)}") from None
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {_shown(value)}")
    if typing.get_origin(hint) is dict:
        keys, values = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_shown(value)}")
        return {_coerce(f"{key} key", k, keys): _coerce(f"{key}.{k}", v, values) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):  # a data source: a mapping of its fields, or its path alone
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a path or a mapping, got {_shown(value)}")
        hints = _field_types(hint)
        for name in value:
            if name not in hints:
                raise ConfigError(f"{key}.{name}: unknown key{did_you_mean(name, hints)}; known keys: {sorted(hints)}")
        return hint(**{k: _coerce(f"{key}.{k}", v, hints[k]) for k, v in value.items()})
    raise ConfigError(f"{key}: unsupported type {hint}")


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


# Names people bring from TRL and the HF Trainer, accepted for the keys they mean (in YAML and on the
# command line).
ALIASES = {"learning_rate": "training.lr", "per_device_train_batch_size": "training.micro_batch_size",
           "num_train_epochs": "training.num_epochs", "max_seq_length": "data.seq_len", "max_length": "data.seq_len",
           "lr_scheduler_type": "training.lr_schedule", "logging_steps": "training.log_every",
           "eval_steps": "training.eval_every", "save_steps": "training.save_every",
           "save_total_limit": "training.keep_last", "adam_epsilon": "training.adam_eps",
           "model_name_or_path": "model.name_or_path", "dataset_name": "data.train_files",
           "lora_r": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
           "lora_target_modules": "lora.target_modules"}


def _unalias(section: str, name: str) -> str:
    """A key of `section` under the name this config gives it (`learning_rate` in training is `lr`)."""
    section_of, _, own = ALIASES.get(name, "").partition(".")
    return own if section_of == section else name


def _leaf_index() -> dict[str, list[str]]:
    """Map a bare leaf name (`lr`, or an alias such as `learning_rate`) to the dotted keys it names."""
    index: dict[str, list[str]] = {}
    for section, cls in typing.get_type_hints(Config).items():
        for name in _field_types(cls):
            index.setdefault(name, []).append(f"{section}.{name}")
    for alias, key in ALIASES.items():
        index.setdefault(alias, [key])
    return index


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections and keys by name."""
    if not isinstance(raw, dict):
        raise ConfigError("the config file must hold a mapping of sections (model, data, training, output)")
    sections = typing.get_type_hints(Config)
    unknown = set(raw) - set(sections)
    if unknown:
        first = sorted(unknown)[0]
        raise ConfigError(f"unknown section(s) {sorted(unknown)}{did_you_mean(first, sections)}; "
                          f"known: {sorted(sections)}")
    built = {}
    for section, cls in sections.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping, got {_shown(values)}")
        hints = _field_types(cls)
        values = {_unalias(section, k): v for k, v in values.items()}
        for key in values:
            if key not in hints:
                raise ConfigError(f"{section}.{key}: unknown key{did_you_mean(key, hints)}; "
                                  f"known keys: {sorted(hints)}")
        built[section] = cls(**{k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()})
    config = Config(**built)
    validate(config)
    return config


# What a step of the run is: changing any of these on resume changes the data order or the meaning of
# a step, so the checkpoint would continue another run. Every other key may change (with a warning).
RUN_IDENTITY = ("model.name_or_path", "model.revision", "data.train_files", "data.eval_files", "data.format",
                "data.oasst_paths", "data.eval_fraction", "data.template", "data.seq_len", "data.packing",
                "data.on_bad_record", "data.on_too_long", "training.seed", "training.micro_batch_size",
                "training.gradient_accumulation_steps", "lora.enabled", "lora.rank", "lora.target_modules",
                "lora.train_embeddings", "lora.quantize", "training.objective", "dpo.beta", "dpo.loss",
                "dpo.label_smoothing", "dpo.reference", "dpo.max_prompt_length")
NOT_COMPARED = ("output.resume_from_checkpoint", "output.allow_config_change", "output.overwrite_output_dir")


def differences(saved: dict[str, Any], config: Config) -> tuple[list[str], list[str]]:
    """(changes to RUN_IDENTITY keys, other changes) between a saved resolved config and this one, each
    as `key: old -> new`."""
    now = to_dict(config)
    identity, other = [], []
    for section, values in now.items():
        hints = _field_types(type(getattr(config, section)))
        for name, value in values.items():
            key = f"{section}.{name}"
            old = (saved.get(section) or {}).get(name, value) if isinstance(saved, dict) else value
            try:  # as this version writes it (a source saved as a mapping of defaults is its path)
                old = _compact(_coerce(key, old, hints[name]))
            except ConfigError:
                pass
            if key not in NOT_COMPARED and old != value:
                (identity if key in RUN_IDENTITY else other).append(f"{key}: {old!r} -> {value!r}")
    return identity, other


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """Turn `--training.lr 1e-4`, `--lr=1e-4` or `--lr 1e-4` into nested dicts.

    Values are read as YAML, so `--train_files "[a.jsonl, b.jsonl]"` and `--push_to_hub false` work.
    """
    leaves = _leaf_index()
    nested: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key}: missing value")
            value = args[i + 1]
            i += 1
        i += 1
        if "." not in key:
            matches = leaves.get(key, [])
            if len(matches) != 1:
                hint = f"ambiguous, use one of {matches}" if matches else f"unknown key{did_you_mean(key, leaves)}"
                raise ConfigError(f"--{key}: {hint}")
            key = matches[0]
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = load_yaml(value, f"--{key}") if value != "" else ""
    return nested


def from_file(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML run file and apply command-line overrides on top."""
    path = Path(path)
    if problem := not_a_file(path):
        raise ConfigError(f"config file {path} {problem}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    raw = load_yaml(text, f"config file {path}") or {}
    for section, values in parse_overrides(overrides or []).items():
        if not isinstance(raw, dict):
            break
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return from_dict(raw)


def load_yaml(text: str, where: str, loader: type = yaml.SafeLoader) -> Any:
    """YAML as yaml.safe_load reads it (no Python tags; or as `loader`, a loader no less safe), its errors said
    by line and column, and its aliases
    bounded: safe_load shares an aliased value, but what reads it next walks every copy (a 1 KB alias bomb
    is 9^9 values), so a document that expands to far more values than its text could hold is refused."""
    try:
        value = yaml.load(text, Loader=loader)  # noqa: S506 - SafeLoader, or BaseLoader (every scalar a string)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: invalid YAML{at}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML ({first_line(e)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None
    if expands_beyond(value, 10 * len(text) + 10_000):
        raise ConfigError(f"{where}: its YAML aliases expand to more than {10 * len(text) + 10_000:,} values; "
                          "write the values out")
    return value


def expands_beyond(value: Any, limit: int) -> bool:
    """Whether `value`, every shared (aliased) part counted each time it appears, holds more than `limit`
    values; walked with a stack and stopped at the limit, so a bomb or a cycle costs `limit` steps."""
    stack, seen = [value], 0
    while stack:
        seen += 1
        if seen > limit:
            return True
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _compact(value: Any) -> Any:
    """A value as the resolved config writes it: a data source with nothing but its path as that path."""
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if dataclasses.is_dataclass(value):
        return value.path if value == type(value)(path=value.path) else dataclasses.asdict(value)
    return value


def to_dict(config: Config) -> dict[str, Any]:
    return {section: {f.name: _compact(getattr(values, f.name)) for f in dataclasses.fields(values)}
            for section, values in ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))}


def save(config: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) next to the run's outputs."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def from_argv(argv: list[str] | None = None) -> Config:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("--"):
        raise ConfigError("usage: loop/train.py configs/RUN.yaml [--key value ...] (--help lists every key)")
    return from_file(argv[0], argv[1:])
