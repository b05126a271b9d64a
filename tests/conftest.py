"""Shared fixtures: the tiny model, tokenizer and corpus built once per session, and a launcher for
real multi-process ZeRO-3 runs of loop/train.py."""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub, which reads it once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: one thread a process (torchrun gives
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # its workers the same), not OpenMP threads spinning for a core

from tools.builders import tiny  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # this worker's own runs (run_in_process, tool_run)

ROOT = Path(__file__).resolve().parents[1]
# A token that must never appear in any file a run writes (tests/report/test_hub.py scans for it).
SECRET_TOKEN = "hf_SENTINELtokenThatMustNeverBeWritten"
os.environ["HF_TOKEN"] = SECRET_TOKEN
os.environ.setdefault("XDG_CACHE_HOME", str(ROOT / ".cache" / "xdg"))  # the data cache of configs that name none


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny GPTBigCode + tokenizer + converted chatterbot corpus, as the quickstart builds them."""
    root = tmp_path_factory.mktemp("tiny")
    tiny.build(root / "model", root / "data" / "chatterbot.jsonl", hidden=64, layers=2, heads=4)
    return root


FAMILIES = ("gpt_bigcode", "starcoder2", "llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tiny_dir):
    """A tiny model of each supported family (its own kind of tokenizer: tools/builders/tiny.py), built on first use."""
    built = {"gpt_bigcode": tiny_dir}

    def get(family: str) -> Path:
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            tiny.build(root / "model", root / "data" / "chatterbot.jsonl", family=family, hidden=64, layers=2, heads=4)
            built[family] = root
        return built[family]

    return get


@pytest.fixture(scope="session")
def prepared(family_dirs, tmp_path_factory):
    """A family's model and tokenizer as a run trains them: the StarChat template installed and, where the
    tokenizer lacked its tokens, the embedding resized; saved, so that every test loads the same weights.
    Returns (model folder, tokenizer, dialogues)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loop.data import templates

    cache = {}

    def get(family: str):
        if family not in cache:
            root = family_dirs(family)
            tok = AutoTokenizer.from_pretrained(root / "model")
            grew, _ = templates.install(tok, "starchat")
            model = AutoModelForCausalLM.from_pretrained(root / "model")
            if grew:
                torch.manual_seed(0)
                model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
            out = tmp_path_factory.mktemp(f"{family}-prepared")
            model.save_pretrained(out)
            tok.save_pretrained(out)
            dialogues = [json.loads(line)["messages"] for line in (root / "data" / "chatterbot.jsonl").open()]
            cache[family] = (out, tok, dialogues)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    from loop.data import templates

    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    templates.install(tok, "starchat")
    return tok


@pytest.fixture(scope="session")
def corpus(tiny_dir) -> list[list[dict]]:
    path = tiny_dir / "data" / "chatterbot.jsonl"
    return [json.loads(line)["messages"] for line in path.open()]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, tiny_dir: Path, out_dir: Path, **sections) -> Path:
    """A small run config on the tiny model; `sections` update model/data/training/output."""
    cfg = {
        "model": {"name_or_path": str(tiny_dir / "model")},
        "data": {"train_files": [str(tiny_dir / "data" / "chatterbot.jsonl")], "seq_len": 256,
                 "eval_fraction": 0.05, "cache_dir": str(tiny_dir / "cache")},  # tokenized once per data set
        "training": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 8, "micro_batch_size": 2,
                     "gradient_accumulation_steps": 2, "log_every": 2, "save_every": 100},
        "output": {"output_dir": str(out_dir)},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config_path: Path, *overrides: str, nproc: int = 2, timeout: int = 600,
           accelerate_config: str = "cpu_zero3.yaml", check: bool = True,
           mixed_precision: str = "bf16") -> subprocess.CompletedProcess:
    """Run loop/train.py under `accelerate launch` with real DeepSpeed ZeRO-3 over gloo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / accelerate_config), "--num_processes", str(nproc),
           "--mixed_precision", mixed_precision,
           "--main_process_port", str(free_port()), str(ROOT / "loop" / "train.py"), str(config_path),
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def trained_run(tiny_dir, tmp_path_factory) -> Path:
    """One 16-step 2-process ZeRO-3 run (checkpoints at steps 8 and 16, steps 10-11 profiled, 3 easy coding
    problems scored at steps 0, 8 and 16), shared by several tests."""
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = write_config(tmp / "run.yaml", tiny_dir, tmp / "out",
                       model={"gradient_checkpointing": True},
                       training={"max_steps": 16, "eval_every": 8, "save_every": 8, "log_every": 4,
                                 "sample_prompts": ["What is Python?", "Hello"], "max_new_tokens": 8,
                                 "sample_every": 8, "peak_flops_per_device": 1e11,
                                 "profile_from": 10, "profile_steps": 2},
                       evaluation={"tasks": str(ROOT / "loop" / "evaluation" / "data" / "easy.jsonl"), "limit": 3,
                                   "max_answer_tokens": 16, "batch_size": 2})
    launch(cfg, "--seed", "7")
    return tmp / "out"


@pytest.fixture(scope="session")
def single_process_run(tiny_dir, tmp_path_factory) -> Path:
    """One 4-step run in this process without DeepSpeed (checkpoints at steps 2 and 4), shared by the tests of
    single-process checkpoints; its config is `config.yaml` in the output directory."""
    tmp = tmp_path_factory.mktemp("single")
    cfg = write_config(tmp / "run.yaml", tiny_dir, tmp / "out",
                       training={"max_steps": 4, "save_every": 2, "keep_last": 5, "eval_every": 0})
    assert run_in_process(cfg) == 0
    return tmp / "out"


@pytest.fixture(scope="session")
def tool_run(family_dirs, tmp_path_factory) -> Path:
    """The tiny Llama-style model (rotary positions: a call's skeleton is learned wherever the question ends)
    trained in this process, no DeepSpeed, on the shipped tool-use set (loop/data/tool_use), one dialogue a
    row, for 1000 steps: about 80 s on two shared CPU cores, more than a test should take, but the fewest steps
    measured to teach it the call's JSON (at 500 and 600 steps it still closes the arguments with one brace too
    many, so no call parses; since the call tags are single new tokens (issue 37.4), 800 leave half the calls
    with a brace too many or too few). Shared by every test of tool use after training (the learned call,
    generate --tools, the card's tools snippet)."""
    from tools.builders import toolset

    tmp = tmp_path_factory.mktemp("tools")
    root = family_dirs("llama")
    cfg = write_config(tmp / "run.yaml", root, tmp / "out",
                       data={"train_files": [str(toolset.SHIPPED / "tool_use.jsonl")], "seq_len": 512,
                             "eval_fraction": 0, "cache_dir": str(tmp / "cache")},
                       training={"lr": 6e-3, "warmup_steps": 10, "max_steps": 1000, "micro_batch_size": 2,
                                 "gradient_accumulation_steps": 1, "log_every": 100, "save_every": 1000,
                                 "eval_every": 0})
    assert run_in_process(cfg) == 0
    return tmp / "out"


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kib, read_only) -> a folder that is a file system of its own: `kib` KiB large (so it fills), or
    read-only. A tmpfs mounted for the test and unmounted after it (needs the right to mount; skipped without)."""
    mounted: list[Path] = []

    def make(kib: int = 64, read_only: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = f"size={kib}k" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode:
            pytest.skip("cannot mount a small file system here (needs root)")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


def run_in_process(config_path: Path, *overrides: str, entry: str = "main") -> int:
    """loop/train.py's main() (or run(), which turns errors into one line and an exit code) in this process
    (one process, no DeepSpeed): cheap, and it sees the test's monkeypatches. Accelerate's global state and
    the signal handlers are put back afterwards."""
    import signal

    from accelerate.state import AcceleratorState

    from loop import train

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return getattr(train, entry)([str(config_path), *overrides])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        AcceleratorState._reset_state(reset_partial_state=True)


def poisoned(tiny_dir: Path, tokenizer, corpus, folder: Path, n_short: int) -> tuple[Path, list, dict]:
    """A copy of the tiny model whose position embeddings past 100 are NaN, so only a dialogue longer
    than 100 tokens meets them, and `n_short` short dialogues plus one long one to train it on.
    Returns (model folder, short dialogues, the long dialogue)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loop.data import templates

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    with torch.no_grad():
        model.transformer.wpe.weight[100:] = float("nan")
    model.save_pretrained(folder / "poisoned")
    tokenizer.save_pretrained(folder / "poisoned")
    length = lambda d: len(templates.encode(tokenizer, d)[0])  # noqa: E731
    short = [d for d in corpus if length(d) < 60][:n_short]
    long = next(d for d in corpus if 110 < length(d) < 250)
    (folder / "train.jsonl").write_text("".join(json.dumps({"messages": d}) + "\n" for d in [*short, long]))
    return folder / "poisoned", short, long


def run_card_snippets(folder: Path) -> str:
    """Run the Python blocks of folder/README.md as a user would paste them (shorter answers), in a fresh
    interpreter; return what they printed, ending with the number of tokens the model generated."""
    card = (folder / "README.md").read_text()
    code = "\n".join(block.split("```", 1)[0] for block in card.split("```python\n")[1:])
    code = code.replace("max_new_tokens=256", "max_new_tokens=8")
    code += '\nprint("new tokens:", out.shape[1] - inputs["input_ids"].shape[1])\n'
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, f"{code}\n{proc.stderr[-3000:]}"
    return proc.stdout


# The files whose tests take minutes (the GPU scripts' toy runs, the launch races, DPO's runs): under pytest-xdist
# (-n 2 in setup.cfg) each file runs on one worker, so these go first and no worker is left with one at the end.
LONGEST_FIRST = ("test_bench_scale.py", "test_bench.py", "test_launch.py", "test_bench_dry_run.py",
                 "test_dpo_run.py", "test_checkpoints.py", "test_accelerator.py", "test_families.py")


def pytest_collection_modifyitems(items) -> None:
    """Tests that launch processes or train, or use a fixture that does, join the `slow` tier (tests/tiers.py);
    then the files are ordered longest first: those named above, then by how many slow tests they hold."""
    from tests import tiers

    slow_in = collections.Counter()
    for item in items:
        if tiers.is_slow(item):
            item.add_marker(pytest.mark.slow)
            slow_in[item.path] += 1
    named = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (named.get(item.path.name, len(named)), -slow_in[item.path], str(item.path)))
