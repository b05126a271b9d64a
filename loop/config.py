"""Run configuration: a YAML file read into typed dataclasses, plus `--key value` overrides.

Every value is checked before any work starts, and errors name the key, so a typo costs seconds,
not a queued GPU job.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loop import attention
from loop.attention import Attention
from loop.export import SaveDtype
from loop.formats import Format, OasstPaths
from loop.metrics import Tracker
from loop.optim import Schedule
from loop.packing import PackingMode
from loop.templates import TemplateName


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names the key."""


def near(word: str, options) -> str:
    """' (did you mean "x"?)' for a near miss among `options`, else nothing."""
    import difflib

    found = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f' (did you mean "{found[0]}"?)' if found else ""


@dataclass
class ModelConfig:
    name_or_path: str = "artifacts/tiny-starcoder"  # Hub id or local folder of the model to fine-tune
    revision: str | None = None  # Hub branch, tag or commit of the model (none: the default branch)
    trust_remote_code: bool = False  # run the model's own modelling code from the Hub (only for models you trust)
    # auto: flash_attention_2 with CUDA + flash-attn, else varlen_attn (torch's kernel) on CUDA, else
    # sdpa. sdpa: block-diagonal masks; varlen_attn, flash_attention_2/3: varlen kernels on GPU (they
    # fall back with a message); sdpa_varlen: the varlen layout on any device, a reference (slow);
    # eager cannot pack (see loop/attention.py).
    attn_implementation: Attention = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # JSONL / JSON / Parquet / YAML files, folders, Hub ids
    eval_files: list[str] = field(default_factory=list)  # held-out dialogues (none: split off eval_fraction)
    # Shape of the input records: messages | prompt_completion | sharegpt | alpaca | oasst | chatterbot.
    format: Format = "messages"
    oasst_paths: OasstPaths = "longest"  # longest | all: which paths of an OpenAssistant tree become dialogues
    eval_fraction: float = 0.05  # share of train dialogues held out for eval when no eval_files are given
    template: TemplateName = "starchat"  # starchat | chatml | tokenizer (the tokenizer's own)
    seq_len: int = 1024  # tokens per packed row; longer dialogues are cut at a turn or dropped
    packing: PackingMode = "bfd"  # bfd (dialogues kept apart) | pad (one per row) | concat (one stream)
    on_bad_record: Literal["error", "skip"] = "error"  # error: list every bad record and stop; skip: count them
    on_too_long: Literal["truncate", "drop"] = "truncate"  # a dialogue over seq_len: cut at a turn, or drop it
    num_proc: int = 1  # processes that tokenize
    cache_dir: str | None = None  # where tokenized data is kept for the next run (none: no cache)


@dataclass
class TrainingConfig:
    seed: int = 42  # fixes the data order and the initial random state
    lr: float = 2e-5  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay, on matrices only
    decay_embeddings_and_norms: bool = False  # also decay embeddings and norm weights
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    lr_schedule: Schedule = "cosine"  # cosine | linear | constant, after the warm-up
    warmup_steps: int = 0  # linear warm-up steps (wins over warmup_ratio)
    warmup_ratio: float = 0.0  # warm-up as a share of all steps
    min_lr_ratio: float = 0.0  # the schedule's floor, as a share of lr
    num_epochs: int = 1  # passes over the training rows
    max_steps: int = 0  # > 0 overrides num_epochs
    micro_batch_size: int = 4  # rows per process per forward pass
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    fused_optimizer: bool = True  # torch's fused AdamW kernel (same results as the plain one within rounding)
    # Tokens per chunk of the loss computed inside the output projection (no float32 logits for the
    # whole micro-batch); 0 computes plain logits first (see loop/loss.py).
    loss_chunk_tokens: int = 8192
    log_every: int = 10  # optimizer steps per logging window
    eval_every: int = 0  # 0: eval only at the end
    save_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept
    sample_every: int = 0  # 0: samples only at the end
    sample_prompts: list[str] = field(default_factory=list)  # answered greedily into samples.md and TensorBoard
    max_new_tokens: int = 64  # length of those answers
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss or gradient: stop, or skip the step
    peak_flops_per_device: float = 0.0  # 0: look the device up (see loop/metrics.py)
    # > 1: record a PyTorch profiler trace of optimizer steps profile_from .. profile_from + profile_steps - 1
    # into output_dir/profile, with device busy time, kernel launches and synchronisations per step.
    profile_from: int = 0
    profile_steps: int = 3  # steps the profiler records (after one warm-up step)


@dataclass
class OutputConfig:
    output_dir: str = "outputs/run"  # checkpoints, final model, logs; one run at a time
    save_dtype: SaveDtype = "bf16"  # dtype of the saved model's weights
    resume_from_checkpoint: str | None = None  # latest | PATH
    # Resume even when the config changes the data order or what a step means (see RUN_IDENTITY).
    allow_config_change: bool = False
    save: bool = True  # false: no checkpoints and no final model (benchmarks, dry runs)
    push_to_hub: bool = False  # upload the final model (and adapter) at the end
    hub_model_id: str | None = None  # NAMESPACE/NAME of the Hub repo
    hub_private: bool = True  # create the repo private
    hub_push_checkpoints: bool = False  # also upload each checkpoint, consolidated, to branch step-N
    hub_upload_wait_s: float = 600.0  # at exit, how long queued checkpoint uploads may still take
    license: str = "other"  # for the model card
    # Experiment trackers, through Accelerate: tensorboard | wandb | mlflow | trackio, or a list.
    report_to: list[Tracker] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class LoraSettings:
    enabled: bool = False  # train LoRA adapters on a frozen base instead of every weight (loop/lora.py)
    rank: int = 16  # rank of each adapter
    alpha: float = 32.0  # adapter scale numerator (the update is scaled by alpha / rank)
    dropout: float = 0.05  # dropout on the adapters' input
    # Linear layers to adapt: [auto] (every attention and MLP projection of the architecture), [all-linear]
    # (every linear layer but the output projection), or a list of module names.
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    # Train the token embedding and the output projection fully as well (they are one matrix when tied).
    # Without it, only the rows of tokens the template added train.
    train_embeddings: bool = False
    quantize: Literal["none", "4bit"] = "none"  # 4bit: QLoRA, the frozen base in NF4 (bitsandbytes)
    merge: bool = True  # also save the base with the adapter merged in, as a plain bf16 model (final/)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


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
        raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{near(value, allowed)}")
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _leaf_index() -> dict[str, list[str]]:
    """Map a bare leaf name (`lr`) to the dotted keys that end with it (`training.lr`)."""
    index: dict[str, list[str]] = {}
    for section, cls in typing.get_type_hints(Config).items():
        for name in _field_types(cls):
            index.setdefault(name, []).append(f"{section}.{name}")
    return index


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections and keys by name."""
    if not isinstance(raw, dict):
        raise ConfigError("the config file must hold a mapping of sections (model, data, training, output)")
    sections = typing.get_type_hints(Config)
    unknown = set(raw) - set(sections)
    if unknown:
        first = sorted(unknown)[0]
        raise ConfigError(f"unknown section(s) {sorted(unknown)}{near(first, sections)}; known: {sorted(sections)}")
    built = {}
    for section, cls in sections.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping, got {values!r}")
        hints = _field_types(cls)
        for key in values:
            if key not in hints:
                raise ConfigError(f"{section}.{key}: unknown key{near(key, hints)}; known keys: {sorted(hints)}")
        built[section] = cls(**{k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()})
    config = Config(**built)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Reject impossible values before any work starts (choices are checked as values are read)."""
    t, d = config.training, config.data
    checks = [
        ("training.lr", t.lr > 0, "must be > 0"),
        ("training.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("training.warmup_steps", t.warmup_steps >= 0, "must be >= 0"),
        ("training.warmup_ratio", 0 <= t.warmup_ratio < 1, "must be in [0, 1)"),
        ("training.min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("training.num_epochs", t.num_epochs >= 1, "must be >= 1"),
        ("training.max_steps", t.max_steps >= 0, "must be >= 0 (0 means: use num_epochs)"),
        ("training.micro_batch_size", t.micro_batch_size >= 1, "must be >= 1"),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps >= 1, "must be >= 1"),
        ("training.max_grad_norm", t.max_grad_norm >= 0, "must be >= 0 (0 disables clipping)"),
        ("training.log_every", t.log_every >= 1, "must be >= 1"),
        ("training.save_every", t.save_every >= 1, "must be >= 1"),
        ("training.keep_last", t.keep_last >= 1, "must be >= 1"),
        ("training.eval_every", t.eval_every >= 0, "must be >= 0"),
        ("training.sample_every", t.sample_every >= 0, "must be >= 0"),
        ("training.max_new_tokens", t.max_new_tokens >= 1, "must be >= 1"),
        ("training.loss_chunk_tokens", t.loss_chunk_tokens >= 0, "must be >= 0 (0: plain logits)"),
        ("training.profile_from", t.profile_from == 0 or t.profile_from >= 2,
         "must be 0 (no profile) or >= 2 (step profile_from - 1 warms the profiler up)"),
        ("training.profile_steps", t.profile_steps >= 1, "must be >= 1"),
        ("lora.rank", config.lora.rank >= 1, "must be >= 1"),
        ("lora.alpha", config.lora.alpha > 0, "must be > 0"),
        ("lora.dropout", 0 <= config.lora.dropout < 1, "must be in [0, 1)"),
        ("data.seq_len", d.seq_len >= 16, "must be >= 16"),
        ("data.eval_fraction", 0 <= d.eval_fraction < 1, "must be in [0, 1)"),
        ("data.num_proc", d.num_proc >= 1, "must be >= 1"),
        ("data.train_files", bool(d.train_files), "must name at least one file or Hub dataset id"),
    ]
    for key, ok, why in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}: {why}, got {getattr(getattr(config, section), name)!r}")
    problem = attention.packing_problem(d.packing, config.model.attn_implementation)
    if problem:
        raise ConfigError(f"model.attn_implementation: {problem}")
    if config.output.push_to_hub and not config.output.save:
        raise ConfigError("output.push_to_hub: needs output.save: true (there is no model to upload)")
    if config.output.push_to_hub and not config.output.hub_model_id:
        raise ConfigError("output.hub_model_id: required when output.push_to_hub is true")
    if config.output.push_to_hub and config.output.hub_model_id.count("/") != 1:
        raise ConfigError(f"output.hub_model_id: {config.output.hub_model_id!r} needs a namespace: "
                          "YOUR_NAME_OR_ORG/REPO")


# What a step of the run is: changing any of these on resume changes the data order or the meaning of
# a step, so the checkpoint would continue another run. Every other key may change (with a warning).
RUN_IDENTITY = ("model.name_or_path", "model.revision", "data.train_files", "data.eval_files", "data.format",
                "data.oasst_paths", "data.eval_fraction", "data.template", "data.seq_len", "data.packing",
                "data.on_bad_record", "data.on_too_long", "training.seed", "training.micro_batch_size",
                "training.gradient_accumulation_steps", "lora.enabled", "lora.rank", "lora.target_modules",
                "lora.train_embeddings", "lora.quantize")
NOT_COMPARED = ("output.resume_from_checkpoint", "output.allow_config_change")


def differences(saved: dict[str, Any], config: Config) -> tuple[list[str], list[str]]:
    """(changes to RUN_IDENTITY keys, other changes) between a saved resolved config and this one, each
    as `key: old -> new`."""
    now = to_dict(config)
    identity, other = [], []
    for section, values in now.items():
        for name, value in values.items():
            key = f"{section}.{name}"
            old = (saved.get(section) or {}).get(name, value) if isinstance(saved, dict) else value
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
                hint = f"ambiguous, use one of {matches}" if matches else f"unknown key{near(key, leaves)}"
                raise ConfigError(f"--{key}: {hint}")
            key = matches[0]
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = yaml.safe_load(value) if value != "" else ""
    return nested


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML run file and apply command-line overrides on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    for section, values in parse_overrides(overrides or []).items():
        if not isinstance(raw, dict):
            break
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return from_dict(raw)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save(config: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) next to the run's outputs."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def from_argv(argv: list[str] | None = None) -> Config:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("--"):
        raise ConfigError("usage: loop/train.py configs/RUN.yaml [--key value ...] (--help lists every key)")
    return load(argv[0], argv[1:])
