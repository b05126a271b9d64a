"""A tracker that cannot start is said in one line before the model loads, and the trackers that had started
are closed."""

from tests.conftest import run_in_process, write_config


def test_a_tracker_that_cannot_start_is_one_line_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys):
    """MLflow 3 refuses a `file:` store unless MLFLOW_ALLOW_FILE_STORE=true; W&B (offline) started before it.
    Issue 25: a traceback after the model loaded, and a W&B run left open."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       output={"report_to": ["tensorboard", "wandb", "mlflow"]})
    assert run_in_process(cfg, entry="run") == 2
    said = capsys.readouterr().out
    (line,) = [line for line in said.splitlines() if "error:" in line]
    assert "output.report_to: mlflow could not start (MlflowException: " in line
    assert "MLFLOW_ALLOW_FILE_STORE=true" in line and "Traceback" not in said
    assert " model: " not in said  # before the model loaded
    assert wandb.run is None  # the W&B run that had started is closed
    assert not (tmp_path / "out" / "config.yaml").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_tensorboard_shows_one_run_with_its_hyperparameters(single_process_run):
    """The hyperparameters go into the run's own folder, not a second run named by a timestamp."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = single_process_run / "tensorboard"
    assert [p for p in board.iterdir() if p.is_dir()] == []
    acc = EventAccumulator(str(board), size_guidance={"tensors": 0})
    acc.Reload()
    assert "_hparams_/experiment" in acc.summary_metadata and acc.Tags()["scalars"]
    config = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    assert b"training.lr" in config
