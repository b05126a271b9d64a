"""Experiment trackers, through Accelerate: each one of `output.report_to` checked before the run starts and
started, before the model loads, with the resolved config as the run's hyperparameters; one that cannot start
is said in one line, and those that had started are closed."""

from __future__ import annotations

import os
from pathlib import Path

from loop.config import ConfigError, Tracker, UserError, first_line, to_dict

__all__ = ["Tracker", "TrackerError", "check", "start"]


class TrackerError(UserError, RuntimeError):
    """A tracker of output.report_to could not start (its settings, its server); the message says which."""


def check(report_to: list[str]) -> None:
    """Refuse a tracker that is not installed: Accelerate would drop it with a warning and its metrics be lost."""
    from accelerate.tracking import get_available_trackers

    missing = sorted(set(report_to) - {t.value for t in get_available_trackers()})
    if missing:
        raise ConfigError(f"output.report_to: {', '.join(missing)} not installed here "
                                 f"(pip install {' '.join(missing)}, or leave it out)")


def start(accelerator, cfg, step: int) -> None:
    """Every tracker of output.report_to, with the resolved config as the run's hyperparameters.

    Accelerate starts W&B, MLflow and Trackio by name (W&B's files and, unless MLFLOW_TRACKING_URI says
    otherwise, MLflow's file store go into the output directory; WANDB_MODE=offline keeps W&B local).
    TensorBoard is built here because its writer must purge what a crashed run logged after `step`.
    """
    from accelerate.tracking import TensorBoardTracker

    out = Path(cfg.output.output_dir)
    flat = {f"{section}.{key}": value if isinstance(value, int | float | str | bool) else str(value)
            for section, values in to_dict(cfg).items() for key, value in values.items()}
    others = [t for t in cfg.output.report_to if t != "tensorboard"]
    if "mlflow" in others and "MLFLOW_TRACKING_URI" not in os.environ:
        # MLflow 3 refuses a file store unless asked; it is still the one backend that needs no server or database.
        os.environ["MLFLOW_TRACKING_URI"] = (out / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if others:
        try:
            accelerator.init_trackers(out.resolve().name, config=flat,
                                      init_kwargs={"wandb": {"dir": str(out), "name": out.name, "resume": "allow"}})
        except Exception as e:  # noqa: BLE001 - every tracker library fails in its own way
            close_started(accelerator)
            library = type(e).__module__.split(".")[0]
            raise TrackerError(f"output.report_to: {library if library in others else ', '.join(others)} could not "
                               f"start ({type(e).__name__}: {first_line(e, 700)}); fix its settings or leave it out "
                               "of output.report_to") from None
    if "tensorboard" in cfg.output.report_to and accelerator.is_main_process:
        board = TensorBoardTracker("tensorboard", out, purge_step=step)
        board.start()
        hyperparameters(board.writer, flat)
        accelerator.trackers.append(board)


def hyperparameters(writer, values: dict) -> None:
    """The run's hyperparameters in its own TensorBoard folder. Accelerate's store_init_configuration (torch's
    add_hparams) writes them into a subfolder named by a timestamp, which TensorBoard shows as a second run."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(values, {}):
        writer.file_writer.add_summary(summary)
    writer.flush()


def close_started(accelerator) -> None:
    """Close the trackers that did start (a W&B run is marked failed, not left open), and forget them all."""
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "wandb":
                tracker.run.finish(exit_code=1)
            else:
                tracker.finish()
        except Exception:  # noqa: BLE001 - it had not started
            pass
    accelerator.trackers = []
