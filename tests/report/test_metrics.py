"""What the run reports: the logging window's scalars, the time split, FLOPs."""

import importlib.util
import os
import re
import time

import pytest
import torch

from loop.model import flops
from loop.report import metrics
from tests.conftest import run_in_process, scalars, write_config


def test_the_window_averages_trained_steps_and_counts_every_step():
    timers = metrics.Timers(torch.device("cpu"))
    meter = metrics.Meter(world=2, peak_flops=1e9, flops=lambda pieces: 10.0 * sum(pieces),
                          packing_efficiency=0.97, timers=timers)
    with timers("forward_backward"):
        time.sleep(0.01)
    meter.add(tokens=100, trained=40, piece_lengths=[60, 40], loss=2.0, grad_norm=torch.tensor(3.0))
    meter.add(tokens=50, trained=20, piece_lengths=[50], loss=None, grad_norm=float("inf"))  # a skipped step
    meter.add(tokens=100, trained=30, piece_lengths=[100], loss=4.0, grad_norm=torch.tensor(1.5))
    scalars = meter.scalars(lr=1e-4, epoch=0.5, tokens_trained=70)
    assert scalars["train/loss"] == 3.0  # the skipped step adds no loss
    assert scalars["train/grad_norm"] == 1.5 and scalars["train/lr"] == 1e-4
    elapsed = 250 / scalars["throughput/tokens_per_s"]
    assert scalars["throughput/trained_tokens_per_s"] == pytest.approx(70 / elapsed)  # skipped: nothing trained
    assert scalars["throughput/tokens_per_s_per_device"] == pytest.approx(scalars["throughput/tokens_per_s"] / 2)
    assert scalars["throughput/mfu"] == pytest.approx(2500 / elapsed / 2 / 1e9)
    assert scalars["time/forward_backward"] == pytest.approx(0.01 / 3, rel=0.5)  # per step of the window
    assert scalars["time/step"] == pytest.approx(elapsed / 3)  # the whole step, wall
    assert 0 <= scalars["time/process_cpu"] < 0.01 / 3  # sleeping costs no CPU
    again = meter.scalars(lr=1e-4, epoch=0.5, tokens_trained=70)
    assert again["throughput/tokens_per_s"] == 0 and "time/forward_backward" not in again  # a new window


def test_attention_flops_follow_each_dialogues_own_length_heads_and_window():
    from loop.model.architecture import Shape

    full = Shape(hidden=8, layers=2, q_heads=2, kv_heads=1, head_dim=4, vocab=10, max_positions=64,
                 windows=(None, None))
    packed = flops.training_flops(1000, full, piece_lengths=[10, 10])
    assert packed == 6 * 1000 * 20 + 12 * 2 * 4 * 2 * (55 + 55)  # 55 causal pairs in 10 tokens, 2 layers
    assert flops.training_flops(1000, full, piece_lengths=[20]) > packed  # one long dialogue costs more
    windowed = Shape(**{**full.__dict__, "windows": (None, 4)})
    assert flops.training_flops(1000, windowed, [10]) == 6 * 1000 * 10 + 12 * 8 * (55 + 10 + 6 * 4)


def test_wandb_offline_and_mlflow_file_store_receive_the_scalars_and_the_config(tiny_dir, tmp_path, monkeypatch):
    """Through Accelerate's trackers, with no network: W&B in offline mode, MLflow with a local file store."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):  # the default: a file store in the output directory
        monkeypatch.setenv(name, "")  # (recorded, so what the run sets is undone afterwards)
        monkeypatch.delenv(name)
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       training={"max_steps": 4, "log_every": 2, "save_every": 100, "lr": 1e-3},
                       output={"report_to": ["tensorboard", "wandb", "mlflow"], "save": False})
    assert run_in_process(cfg) == 0
    # W&B 0.31 keeps an offline run only as protobuf records in run-*.wandb (no Python reader ships with it),
    # so the scalars and the config are read out of its bytes.
    record = next((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    losses = {float(v) for v in re.findall(rb"train/loss[^0-9]{1,4}(\d[\d.e+-]*)", record)}
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert re.search(rb"training\.lr[^0-9]{1,4}0\.001", record)

    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "out" / "mlruns").as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4]
    assert run.data.params["training.lr"] == "0.001" and run.data.params["data.seq_len"] == "256"

    assert [s for s, _ in scalars(tmp_path / "out")["train/loss"]] == [2, 4]  # TensorBoard as well


def test_the_console_gets_a_short_line_and_train_log_every_scalar(tiny_dir, tmp_path):
    """Log lines go through tqdm (never into the middle of the bar); the console line is short and
    readable, train.log and TensorBoard have the full set."""
    import subprocess
    import sys

    from tests.conftest import ROOT, write_config

    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       training={"max_steps": 4, "log_every": 2, "eval_every": 2, "save_every": 100})
    # No DeepSpeed, bf16 autocast over float32 weights: what `accelerate launch --mixed_precision bf16` runs
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}
    proc = subprocess.run([sys.executable, "loop/train.py", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stdout.splitlines() if " INFO step " in line and "loss" in line]
    assert any(line.endswith("tokens/s") or "MFU" in line for line in console)
    assert all(len(line) < 130 and "throughput/" not in line for line in console), console
    assert all("train:" not in line for line in proc.stdout.splitlines())  # the bar stays on stderr, apart
    assert "checkpoint" in proc.stdout and "Removed shared tensor" not in proc.stderr  # accelerate's note on ties
    log = (tmp_path / "out" / "train.log").read_text()
    assert log.count("throughput/tokens_per_s=") == 2 and "time/forward_backward=" in log
    assert "step 2/4  loss" not in log  # the short form is for the console only


def test_a_tracker_that_is_not_installed_stops_the_run_before_it_starts(tiny_dir, tmp_path, capsys):
    """Accelerate alone would drop it with a warning, and the run's metrics would go nowhere."""
    if importlib.util.find_spec("trackio"):
        pytest.skip("trackio is installed here")
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", output={"report_to": ["trackio"]})
    assert run_in_process(cfg, entry="run") == 2
    said = capsys.readouterr().out.strip().splitlines()
    assert said[-1].endswith("error: output.report_to: trackio not installed here (pip install trackio, or leave "
                             "it out)") and "Traceback" not in "".join(said)
    assert not (tmp_path / "out" / "checkpoints").exists()
