"""Objectives are plug-ins (loop/training/objective.py, registry.py): every name of the config's list is a module
with its PLUGIN, nothing outside loop/training/ asks which objective runs, and a third objective, defined only in
this file, goes through the real step, the run's evaluation component, the log and the model card."""

import ast
import logging
import typing
from pathlib import Path

import pytest
import torch

from loop import config
from loop.data import batches, templates
from loop.data.batches import to_device
from loop.engine.accelerator import make_accelerator
from loop.evaluation.held_out import Evaluator
from loop.model import architecture, attention, load
from loop.model.head import summed_cross_entropy
from loop.report import card, metrics
from loop.state.progress import LoopState
from loop.training import optim, registry, sft
from loop.training.objective import CardSection, Objective, Plugin
from loop.training.step import train_step
from tests.conftest import ROOT


def test_every_objective_the_config_lists_is_the_plugin_of_its_module():
    assert registry.NAMES == typing.get_args(config.Objective) and len(registry.NAMES) >= 2
    for name in registry.NAMES:
        assert registry.plugin(name).name == name and (ROOT / "loop" / "training" / f"{name}.py").is_file()
    dpo, sft_run = (config.from_dict({"training": {"objective": name}, "data": {"train_files": ["x.jsonl"]}})
                    for name in ("dpo", "sft"))
    assert registry.pick(dpo).dropout is False and registry.pick(sft_run).dropout is True


def asks_for_an_objective(source: str) -> list[int]:
    """Lines that compare with an objective's name (or with the objective setting itself), or look one up by
    its name: what a plug-in makes unnecessary."""
    names = set(registry.NAMES)

    def is_name(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    def is_setting(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "objective") or (
            isinstance(node, ast.Name) and node.id in ("objective", "preferring"))

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(is_name(s) or is_setting(s) for s in [node.left, *node.comparators]):
            found.append(node.lineno)
        elif isinstance(node, ast.Subscript) and is_name(node.slice) or isinstance(node, ast.Dict) and any(
                is_name(k) for k in node.keys):
            found.append(node.lineno)
    return found


def test_no_code_outside_loop_training_asks_which_objective_runs():
    """The package outside loop/training/ and the tools (not the benchmarks: "dpo" there names a benchmark)."""
    files = [p for p in (ROOT / "loop").rglob("*.py") if p.relative_to(ROOT / "loop").parts[0] != "training"]
    files += sorted((ROOT / "tools").glob("*.py"))
    found = [f"{p.relative_to(ROOT)}:{line}" for p in files for line in asks_for_an_objective(p.read_text())]
    assert not found, found
    assert len(files) > 40
    # The check can tell: what the code did before the seam.
    for before in ('preferring = t.objective == "dpo"', 'x = 0.0 if cfg.training.objective == "dpo" else 1',
                   'if "dpo" != name: pass', 'f = {"dpo": 1}', 'g = table["sft"]'):
        assert asks_for_an_objective(before) == [1], before


# A third objective, here only: half the summed token cross-entropy, normalised by the step's rows, with a
# batch key of its own (the batch's row count), two statistics, no dropout, its own eval words, console
# statistic and model-card section.
def rows_of(batch, rows):
    return batch | {"toy_rows": torch.tensor(float(len(rows)))}


def toy_loss_sum(model, batch):
    tokens = summed_cross_entropy(model, batch)
    return tokens / 2, torch.stack([batch["toy_rows"].to(tokens.device), tokens.detach()])


def toy_card(cfg, final_eval) -> CardSection:
    return CardSection(tags=["toy"], hyperparameters={"objective": "toy (half the token loss a row)"},
                       trained="trained by a toy objective defined in a test.",
                       results=f"; final toy rows a row: {final_eval['eval/rows']:.1f}", data="toy dialogues")


TOY = Plugin("toy", loss=lambda cfg: Objective("toy", toy_loss_sum, lambda step: step.rows, lambda b: b["toy_rows"],
                                               ("rows", "token_loss")),
             prepare=sft.prepare_here, prepare_run=sft.prepare_run, check_data=sft.check_data, card=toy_card,
             batch_keys=rows_of, dropout=False, eval_words=lambda result: f", toy rows {result['eval/rows']:.1f}",
             console={"train/rows": "toy rows {:.0f}"})


@pytest.fixture
def accelerator_reset():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_third_objective_defined_only_here_trains_evaluates_and_writes_its_card(tiny_dir, tmp_path,
                                                                                  accelerator_reset):
    """In this process, one process without DeepSpeed: the run's own functions with the toy plug-in."""
    cfg = config.from_dict({"model": {"name_or_path": str(tiny_dir / "model")},
                            "data": {"train_files": [str(tiny_dir / "data" / "chatterbot.jsonl")], "seq_len": 256,
                                     "eval_fraction": 0.05, "cache_dir": str(tiny_dir / "cache")},
                            "training": {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 2,
                                         "lr": 1e-3, "warmup_steps": 0},
                            "output": {"output_dir": str(tmp_path / "out")}})
    model_config, attn, _ = load.preflight(cfg, TOY.dropout)
    accelerator = make_accelerator(cfg)
    tokenizer = load.load_tokenizer(cfg)
    added, end = templates.install(tokenizer, cfg.data.template)
    data = TOY.prepare_run(accelerator, cfg, tokenizer)
    train, evals = batches.planners(data, cfg, tokenizer.pad_token_id, attention.layout(attn, cfg.data.packing), 1, 0,
                                    architecture.Shape.of(model_config).mask_windows(), extra=TOY.batch_keys)
    attention.register()
    model = load.load_model(cfg, attn, tokenizer, added, end, accelerator, TOY.dropout)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # its model setting
    model, optimizer = accelerator.prepare(model, optim.make_optimizer(model, cfg.training))
    model.train()

    step, objective = train(0), TOY.loss(cfg)
    with torch.no_grad():  # what the step must report: the toy loss over the step's rows, by hand
        expected = sum(toy_loss_sum(model, to_device(b, accelerator.device))[0].item()
                       for b in step.micro_batches) / step.rows
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(model, optimizer, accelerator, step, objective, 1.0, metrics.Timers(accelerator.device), False)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.statistics["rows"] == 1.0 and result.statistics["token_loss"] == pytest.approx(2 * expected, 1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    short, _ = metrics.window_lines({"train/loss": result.loss, "train/lr": 1e-3, "train/grad_norm": 1.0,
                                     "throughput/tokens_per_s": 10.0, "train/rows": 1.0}, 1, 2, TOY.console)
    assert "  toy rows 1  lr " in short

    summary, state, said = card.RunSummary(world_size=1, hardware="cpu"), LoopState(step=1), []
    log = logging.getLogger("loop")
    handler = logging.Handler()
    handler.emit = lambda record: said.append((record.getMessage(), getattr(record, "only", None)))
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the logger's cache of levels
    try:
        Evaluator(model, accelerator, TOY, objective, evals, 1, 2, summary).maybe_evaluate(state)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    loss = summary.eval_results["eval/loss"]
    assert summary.eval_results["eval/rows"] == 1.0 and state.eval_losses == [[1, loss]] and summary.eval_loss == loss
    assert (f"step 1: eval loss {loss:.4f}, toy rows 1.0", None) in said
    file_line = next(message for message, only in said if only == "file")
    assert file_line.startswith(f"step 1: eval/loss={loss:.4g} eval/rows=1 eval/token_loss=")

    text = card.model_card(cfg, summary, tokenizer.chat_template, "example", "model", Path(tmp_path),
                           TOY.card(cfg, summary.eval_results)).content
    for said_in_card in ("- toy\n", "trained by a toy objective defined in a test.", "final toy rows a row: 1.0",
                         "| objective | toy (half the token loss a row) |", "(toy dialogues)"):
        assert said_in_card in text, said_in_card


def test_inspect_data_shows_what_the_chosen_objective_trains_on(tiny_dir, corpus, tmp_path, capsys):
    """tools/inspect_data.py asks the plug-in for the data and what each sequence is: pairs for DPO."""
    import json

    from loop.data import preference
    from tools import inspect_data

    pairs = preference.from_dialogues({"all": [d for d in corpus if len(d[-1]["content"].split()) >= 4]})[:40]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"name_or_path": str(tiny_dir / "model")}, "training": {"objective": "dpo"},
                               "data": {"train_files": [str(tmp_path / "pairs.jsonl")], "seq_len": 256,
                                        "cache_dir": str(tmp_path / "cache")}}))
    assert inspect_data.main([str(cfg), "--examples", "2", "--color", "never"]) == 0
    said = capsys.readouterr().out
    assert "--- example 0 (pair " in said and (", chosen, " in said or ", rejected, " in said)
    assert " preference pairs, skipped " in said
