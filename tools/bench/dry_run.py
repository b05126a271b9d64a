"""Check the device commands a GPU script's --dry-run kept, on CPU, without running them: each module or script
is imported and its arguments parsed by its own parser (stopped there); an `accelerate launch` has its launcher
options parsed and its config file read by Accelerate; loop/train.py has its run config and overrides read
back and its model checked as a run checks it before loading a weight (architecture, attention, LoRA) and
built on the meta device for its parameter count. One line per command; exit 1 when any fails.

  python -m tools.bench.dry_run WORK/dry-run.commands     # one shell-quoted command a line (gpu_common.sh)
"""

from __future__ import annotations

import argparse
import json
import runpy
import shlex
import sys
from pathlib import Path
from unittest import mock


class Parsed(BaseException):  # BaseException: no `except Exception` on the way up can swallow it
    """Raised where the checked program's parser returns: its arguments were accepted; nothing ran after."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def parse_only(target: str, args: list[str], module: bool) -> str:
    """Run a module (`python -m`) or script up to its argument parser: imports and arguments, no work."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, argv=None, namespace=None):
        raise Parsed(real(self, argv, namespace))

    argv = sys.argv
    sys.argv = [target, *args]
    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
            (runpy.run_module if module else runpy.run_path)(target, run_name="__main__")
    except Parsed as parsed:
        return f"arguments accepted ({len(vars(parsed.namespace))} settings)"
    except SystemExit as e:
        if e.code not in (0, None):
            raise ValueError(f"its parser refused the arguments (exit {e.code})") from None
    finally:
        sys.argv = argv
    raise ValueError("it ran without reaching an argument parser, so it cannot be checked without running")


def check_train(args: list[str]) -> str:
    """loop/train.py's config read back and its model checked on the meta device, as the run starts."""
    import loop.train  # noqa: F401 - the entry point's imports, every stage
    from loop import config
    from loop.model import estimate, load

    cfg = config.from_argv(args)
    model_config, attn, _ = load.preflight(cfg)
    params, _largest_layer = estimate.count_params(model_config, cfg.model.trust_remote_code)
    t = cfg.training
    return (f"config read back: {model_config.model_type} ({params:,} parameters on the meta device), "
            f"attention {attn}, {t.objective}, micro-batch {t.micro_batch_size} x {cfg.data.seq_len} tokens")


def check_launch(args: list[str]) -> str:
    """accelerate launch: its options, its config file (and a DeepSpeed file it names), then what it launches."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    a = launch_command_parser().parse_args(args)
    settings = load_config_from_file(a.config_file)
    ds_file = (getattr(settings, "deepspeed_config", None) or {}).get("deepspeed_config_file")
    if ds_file:
        json.loads(Path(ds_file).read_text())
    launched = ("loop/train.py: " + check_train(a.training_script_args)
                if not a.module and Path(a.training_script).name == "train.py"
                else f"{a.training_script}: " + parse_only(a.training_script, a.training_script_args, a.module))
    return f"accelerate launch ({Path(a.config_file).name}, {settings.distributed_type}); {launched}"


def check(command: list[str]) -> str:
    if command[0] == "timeout":  # a time box (gpu_scale.sh's BOX): check what it boxes
        command = command[next(i for i, w in enumerate(command) if w.isdigit() and command[i - 1] != "-k"):][1:]
    _python, *rest = command
    if rest[0] == "-m":
        target, args = rest[1], rest[2:]
        if target == "accelerate.commands.launch":
            return check_launch(args)
        return f"{target}: " + parse_only(target, args, module=True)
    return f"{rest[0]}: " + parse_only(rest[0], rest[1:], module=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commands", type=Path, help="the file of commands (one shell-quoted command a line)")
    a = p.parse_args(argv)
    failed = 0
    for line in a.commands.read_text().splitlines():
        if not line.strip():
            continue
        try:
            print(f"ok: {check(shlex.split(line))}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure is the finding; the other commands are still checked
            failed += 1
            print(f"FAILED: {line.strip()}\n  {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
