"""The reference cache is keyed by everything a reference log-probability depends on, and by nothing else."""

import dataclasses
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loop.config import Config, DataConfig, ModelConfig
from loop.data import batches, pairs
from loop.data.packing import Rows
from loop.training import reference


def test_the_cache_key_follows_the_model_files_the_data_and_the_precision_and_nothing_else(tiny_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir / "model", model)
    ids = [[1, 2, 3, 4], [1, 2, 5], [7, 8, 9], [7, 8, 1, 1]]
    masks = [[0, 0, 1, 1], [0, 0, 1], [0, 1, 1], [0, 1, 1, 1]]
    columns = batches.Columns.from_lists(ids, masks)
    planner = batches.Planner(Rows.of(pairs.plan_rows(columns.lengths(), 64, "bfd")), columns, 0, "mask", True, 42, 2,
                              0, 2, 1)
    cfg = Config(model=ModelConfig(name_or_path=str(model)), data=DataConfig(train_files=["x"]))
    key = lambda cfg=cfg, p=planner, **kw: reference.cache_key(  # noqa: E731
        cfg, {"train": p}, [], kw.get("precision", "bf16"), kw.get("attention", "sdpa"), kw.get("world", 2))
    first = key()
    assert key() == first
    assert key(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, lr=1.0))) == first  # not in it
    other = batches.Columns.from_lists([*ids[:3], [7, 8, 1, 2]], masks)
    assert key(p=dataclasses.replace(planner, columns=other)) != first  # one token of the data
    assert key(precision="no") != first and key(attention="sdpa_varlen") != first and key(world=1) != first
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3 * torch.ones_like(weights[name])
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert key() != first  # the same file names and sizes, other weights


def test_a_model_rewritten_in_place_in_its_middle_at_the_same_size_is_another_model(tmp_path):
    """On main the key hashed only the first and last megabyte of each weight file."""
    (tmp_path / "config.json").write_text("{}")
    weights = {"w": torch.zeros(1 << 20)}  # 4 MB
    save_file(weights, str(tmp_path / "model.safetensors"))
    first = reference.model_identity(str(tmp_path), None)
    weights["w"][1 << 19] = 1.0
    save_file(weights, str(tmp_path / "model.safetensors"))
    assert reference.model_identity(str(tmp_path), None) != first


def test_another_models_reference_under_this_key_is_computed_again_with_one_warning(tiny_dir, tmp_path, monkeypatch):
    """The reference pass itself, in this process: another model's file swapped in under this key, then a
    file whose numbers were changed, each give a warning and the starting model's own log-probabilities."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM

    warned: list[str] = []
    monkeypatch.setattr(reference.log, "warning", warned.append)
    said = lambda: [w for w in warned if "reference cache" in w]  # noqa: E731
    ids = [[1, 2, 3, 4], [1, 2, 5], [7, 8, 9], [7, 8, 1, 1]]
    masks = [[0, 0, 1, 1], [0, 0, 1], [0, 1, 1], [0, 1, 1, 1]]
    columns = batches.Columns.from_lists(ids, masks)
    planners = {"train": batches.Planner(Rows.of(pairs.plan_rows(columns.lengths(), 64, "bfd")), columns, 0, "mask",
                                         True, 42, 1, 0, 2, 1)}
    cfg = Config(model=ModelConfig(name_or_path=str(tiny_dir / "model")), data=DataConfig(train_files=["x"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    other = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True)
        path = tmp_path / "reference-ours.safetensors"

        def attach(m, key: str) -> torch.Tensor:
            reference.attach(accelerator, m, cfg, planners, key, tmp_path)
            return load_file(tmp_path / f"reference-{key}.safetensors")["train"].clone()  # not a view of the file

        theirs, ours = attach(other, "theirs"), attach(model, "ours")
        assert not said() and not torch.equal(theirs, ours)
        shutil.copy(tmp_path / "reference-theirs.safetensors", path)
        assert torch.equal(attach(model, "ours"), ours)
        (first,) = said()
        assert first.endswith("reference-ours.safetensors is made for another model or data; computing it again")
        with safe_open(path, "np") as f:
            kept = f.metadata()
        values = load_file(path)
        values["train"] = values["train"] + 0.5
        save_file(values, str(path), metadata=kept)  # its key kept, other numbers
        assert torch.equal(attach(model, "ours"), ours)
        assert len(said()) == 2 and "does not match its digest; computing it again" in said()[-1]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
