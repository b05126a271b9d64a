"""The reference cache is keyed by everything a reference log-probability depends on, and by nothing else."""

import dataclasses
import shutil

import torch
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
