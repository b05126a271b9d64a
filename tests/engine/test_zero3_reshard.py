"""A ZeRO-3 checkpoint re-partitioned for another number of processes: DeepSpeed's sub-groups predicted, and the
fp32 masters and Adam's moments of a real 2-process checkpoint carried through other process counts and back
bit for bit (the resumes themselves: tests/state/test_checkpoints.py)."""

import shutil

import pytest
import torch

from loop.engine import zero3_reshard
from loop.engine.safe_load import ConsolidationError, torch_load
from loop.engine.zero3_files import SHARDS


def test_sub_groups_are_cut_where_deepspeed_cuts_them():
    groups = [{"a": (10,), "b": (4, 3), "c": (5,)}, {"d": (7,)}, {}]
    # One process: partitions of 10, 12, 5 elements; cut once a sub-group reaches 12.
    assert zero3_reshard.sub_groups(groups, 1, 12) == [(0, ["a", "b"]), (0, ["c"]), (1, ["d"]), (2, [])]
    # Two processes: 5, 6, 3 elements, 14 in all: the group stays whole.
    assert zero3_reshard.sub_groups(groups, 2, 14) == [(0, ["a", "b", "c"]), (1, ["d"]), (2, [])]
    assert zero3_reshard.sub_groups(groups, 2, 1) == [(0, ["a"]), (0, ["b"]), (0, ["c"]), (1, ["d"]), (2, [])]


def optimizer_states(ckpt) -> list[dict]:
    return [torch_load(f)["optimizer_state_dict"] for f in sorted((ckpt / SHARDS).glob("*_optim_states.pt"))]


def test_a_checkpoint_goes_to_other_process_counts_and_back_bit_for_bit(trained_run, tmp_path):
    """2 -> 1 -> 2 and 2 -> 3 -> 2 (three processes: parameters padded to a multiple of 3), and sub-groups of
    another size on the way: every rank's fp32 masters, Adam moments, step counts and hyperparameters as saved."""
    ckpt = trained_run / "checkpoints" / "step_00000016"
    for world, size in ((1, zero3_reshard.SUB_GROUP_SIZE), (3, 20_000)):
        there, back = tmp_path / f"to{world}", tmp_path / f"back{world}"
        zero3_reshard.write(ckpt, there, world, size)
        assert len(list((there / SHARDS).glob("*_optim_states.pt"))) == world
        assert sorted(p.name for p in there.glob("rng_state_*")) == [f"rng_state_{r}.safetensors" for r in range(world)]
        shutil.copy(ckpt / "config.json", there / "config.json")
        zero3_reshard.write(there, back, 2, zero3_reshard.SUB_GROUP_SIZE)
        for saved, again in zip(optimizer_states(ckpt), optimizer_states(back), strict=True):
            assert saved["partition_count"] == again["partition_count"] == 2
            assert all(torch.equal(a, b) for a, b in zip(saved["fp32_flat_groups"], again["fp32_flat_groups"],
                                                         strict=True))
            inner, inner_again = saved["optimizer_state_dict"], again["optimizer_state_dict"]
            assert inner["param_groups"] == inner_again["param_groups"]
            assert inner["state"].keys() == inner_again["state"].keys()
            for k, state in inner["state"].items():
                assert state.keys() == inner_again["state"][k].keys() == {"step", "exp_avg", "exp_avg_sq"}
                assert all(torch.equal(v, inner_again["state"][k][name]) for name, v in state.items())
    ones = optimizer_states(tmp_path / "to1")[0]
    assert ones["optimizer_state_dict"]["state"][0]["exp_avg"].numel() == ones["fp32_flat_groups"][0].numel()


def test_a_layout_it_does_not_know_is_refused(trained_run, tmp_path, monkeypatch):
    """Shards cut into other sub-groups than their DeepSpeed config says (here: written for sub-groups of 1,000
    elements, then read as if the config they carry kept the default) are refused, not misread."""
    ckpt, odd = trained_run / "checkpoints" / "step_00000016", tmp_path / "odd"
    zero3_reshard.write(ckpt, odd, 2, 1000)
    shutil.copy(ckpt / "config.json", odd / "config.json")
    monkeypatch.setattr(zero3_reshard, "sub_group_size", lambda ds_config: zero3_reshard.SUB_GROUP_SIZE)
    with pytest.raises(ConsolidationError, match="sub-groups of .* not the .* of DeepSpeed's layout"):
        zero3_reshard.write(odd, tmp_path / "out", 1, zero3_reshard.SUB_GROUP_SIZE)
