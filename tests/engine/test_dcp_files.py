"""FSDP2's checkpoint files (torch.distributed.checkpoint) in this process, no launch: the same state gives the
same bytes, the weights stream back whole with tied ones left out, the optimizer's values load as plain data,
and an index that would run code is refused without running it."""

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from loop.engine import dcp_files, registry
from loop.engine.safe_load import UntrustedCheckpoint


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def trained() -> tuple[Tied, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.head(model.mid(model.emb(torch.tensor([1, 2, 3])))).sum().backward()
    optimizer.step()
    return model, optimizer


def save(model, optimizer, ckpt) -> None:
    (ckpt / dcp_files.FOLDER).mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    state = {dcp_files.MODEL: model.state_dict(), dcp_files.OPTIMIZER: optimizer.state_dict(),
             dcp_files.ALIASES: {"head.weight": "emb.weight"}}
    dcp.save(state, storage_writer=dcp_files.writer(ckpt / dcp_files.FOLDER), no_dist=True)


def test_the_same_state_gives_the_same_bytes_and_streams_back_whole(tmp_path):
    """DCP's own writer stamps the folder and a random id into its index, so a resumed run's checkpoint could
    never have the uninterrupted run's digests; the loop's writer leaves them out."""
    model, optimizer = trained()
    for name in ("a", "b"):
        save(model, optimizer, tmp_path / name)
    for name in (dcp_files.INDEX, "__0_0.distcp"):
        assert (tmp_path / "a" / "dcp" / name).read_bytes() == (tmp_path / "b" / "dcp" / name).read_bytes(), name
    assert registry.of_files(["dcp/.metadata", "dcp/__0_0.distcp"]).name == "fsdp2"
    assert dcp_files.missing(tmp_path / "a", 2) == ["dcp/__1_0.distcp"]
    assert [dcp_files.rank_of(n) for n in ("dcp/__1_0.distcp", "dcp/.metadata")] == [1, None]
    weights = registry.weights(tmp_path / "a")
    assert weights.aliases == {"head.weight": "emb.weight"}
    streamed = dict(weights.tensors())
    assert list(streamed) == list(weights.shapes) == ["emb.weight", "mid.weight", "mid.bias"]
    for name, tensor in streamed.items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_streaming_a_checkpoint_opens_each_data_file_once_and_closes_it(tmp_path):
    """Every chunk of every tensor is read from the data files by offset: a descriptor per chunk would run out
    (a 1.1B model written by 8 GPUs has about 1,600 chunks, the usual limit is 1,024)."""
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(50)])  # 100 tensors in one data file
    ckpt = tmp_path / "ck"
    (ckpt / dcp_files.FOLDER).mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    dcp.save({dcp_files.MODEL: model.state_dict(), dcp_files.ALIASES: {"x": "y"}},
             storage_writer=dcp_files.writer(ckpt / dcp_files.FOLDER), no_dist=True)
    before = len(os.listdir("/proc/self/fd"))
    weights = registry.weights(ckpt)
    assert len(os.listdir("/proc/self/fd")) == before  # the aliases read, their file closed
    assert sum(1 for _ in weights.tensors()) == 100
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_optimizer_state_loads_back_exactly_as_plain_data(tmp_path):
    model, optimizer = trained()
    save(model, optimizer, tmp_path / "ck")
    fresh, fresh_optimizer = Tied(), torch.optim.AdamW(Tied().parameters(), lr=5.0)
    state = {dcp_files.MODEL: fresh.state_dict(), dcp_files.OPTIMIZER: optimizer.state_dict()}
    state[dcp_files.OPTIMIZER]["param_groups"][0]["lr"] = 5.0
    for value in state[dcp_files.OPTIMIZER]["state"].values():
        for tensor in value.values():
            tensor.zero_()
    dcp_files.load(state, tmp_path / "ck" / "dcp", no_dist=True)
    fresh_optimizer.load_state_dict(state[dcp_files.OPTIMIZER])
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-3
    for key, value in trained()[1].state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(state[dcp_files.OPTIMIZER]["state"][key][name], tensor), (key, name)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[dcp_files.MODEL][name], tensor), name


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("content", ["payload", "truncated"])
def test_an_index_that_would_run_code_or_is_cut_short_is_refused_unrun(tmp_path, content):
    model, optimizer = trained()
    save(model, optimizer, tmp_path / "ck")
    index, marker = tmp_path / "ck" / "dcp" / dcp_files.INDEX, tmp_path / "pwned"
    index.write_bytes(pickle.dumps(Payload(marker)) if content == "payload" else index.read_bytes()[:100])
    said = registry.unreadable(index)
    assert said.startswith(f"{index}: unreadable, truncated or not plain data"), said
    with pytest.raises(UntrustedCheckpoint) as refused:
        dcp_files.load({dcp_files.MODEL: model.state_dict()}, index.parent, no_dist=True)
    assert str(refused.value) == said
    assert not marker.exists()


def test_an_optimizer_value_that_would_run_code_is_named_by_verification_unrun(tmp_path):
    """A data file tampered in place, its manifest entry rewritten to match (tests/state/test_integrity.py): only
    reading each item as the loader reads it finds it. DCP's own planner would run this one (it reads the values
    that are not tensors with weights_only=False); the loop's refuses it, and verification now names it."""
    model, optimizer = trained()
    save(model, optimizer, tmp_path / "ck")
    data, marker = tmp_path / "ck" / "dcp" / "__0_0.distcp", tmp_path / "pwned"
    assert registry.unreadable(data) is None
    info = next(v for k, v in dcp_files.read_index(data.parent).storage_data.items()
                if k.fqn == "optimizer.param_groups.0.lr")
    with open(data, "r+b") as f:
        f.seek(info.offset)
        f.write(pickle.dumps(Payload(marker), protocol=2).ljust(info.length, b"\0"))
    said = registry.unreadable(data)
    assert said.startswith(f"{data}: optimizer.param_groups.0.lr is unreadable, truncated or not plain data"), said
    assert "posix.system" in said
    state = {dcp_files.MODEL: Tied().state_dict(), dcp_files.OPTIMIZER: optimizer.state_dict()}
    with pytest.raises(UntrustedCheckpoint, match="not plain data"):
        dcp_files.load(state, data.parent, no_dist=True)
    assert not marker.exists()
