import math

import pytest
from transformers import AutoModelForCausalLM

from loop.config import TrainingConfig
from loop.training import optim


def test_no_weight_decay_on_biases_norms_and_embeddings(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optim.param_groups(model, TrainingConfig(weight_decay=0.1))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "transformer.h.0.attn.c_attn.bias"} <= exempt
    assert {names[id(p)] for p in decay["params"]} == {n for n in names.values() if n not in exempt}
    assert all(n.endswith(".weight") and ".ln_" not in n for n in (names[id(p)] for p in decay["params"]))
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    decay, _ = optim.param_groups(model, TrainingConfig(weight_decay=0.1, decay_embeddings_and_norms=True))
    assert "transformer.wte.weight" in {names[id(p)] for p in decay["params"]}


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    cfg = TrainingConfig(lr=1e-3, lr_schedule=schedule, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = [optim.lr_at(s, 100, cfg) for s in range(100)]
    assert optim.warmup_steps(cfg, 100) == 10
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # warm-up rises
    if schedule == "constant":
        assert set(lrs[10:]) == {1e-3}
    else:
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then never rises
        assert lrs[-1] == pytest.approx(1e-4 + 9e-4 * (0.5 * (1 + math.cos(math.pi * 89 / 90)) if schedule == "cosine"
                                                          else 1 / 90))


def test_warmup_in_steps_wins_over_ratio_and_schedule_is_per_optimizer_step():
    cfg = TrainingConfig(lr=1.0, warmup_steps=4, warmup_ratio=0.5)
    assert optim.warmup_steps(cfg, 100) == 4
    # A pure function of the optimizer step: the same for 1 or 64 processes, and after a resume.
    assert [optim.lr_at(s, 100, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_fused_adamw_gives_the_plain_results_within_rounding(tiny_dir):
    import torch

    weights, ids = [], torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(0))
    for fused in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
        optimizer = optim.make_optimizer(model, TrainingConfig(lr=1e-3, weight_decay=0.1, fused_optimizer=fused))
        assert optimizer.defaults["fused"] is (True if fused else None)
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    moved = max((weights[1][k] - AutoModelForCausalLM.from_pretrained(tiny_dir / "model").state_dict()[k]).abs().max()
                for k in weights[1])
    assert moved > 1e-3  # the steps did something
    # Adam divides by sqrt(v): where a gradient is ~0 (a key bias, which softmax ignores) rounding decides
    # the direction, so the bound is a tenth of one step's size (lr) rather than float32 epsilon.
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-4, msg=k)
