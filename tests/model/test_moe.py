"""A mixture of experts' router load-balancing loss, in one process against plain transformers: for one
unpadded dialogue the loop's total (and its gradient) is `model(..., labels=...).loss` with the released
configs' `output_router_logits: true`; for several dialogues the step's value is transformers' over all of
their tokens together, whether they are packed, padded or split into micro-batches. A router the loop does
not know is refused before any weight loads."""

import contextlib

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM

from loop.config import Config, ConfigError
from loop.data.batches import Columns, collate, to_device
from loop.data.packing import IGNORE
from loop.model import architecture, attention, head, moe
from loop.training.sft import SFT
from loop.training.step import train_step
from tests.conftest import run_in_process, write_config

MOE = ("qwen3_moe", "qwen2_moe", "mixtral")


class Capture(torch.optim.SGD):
    """An optimizer that only keeps the gradients it is given."""

    def step(self, closure=None):
        self.grads = {id(p): p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None}


def dialogues(vocab: int, n: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """n dialogues of random tokens, the second half of each trained."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, vocab, size=int(rng.integers(20, 60))).tolist() for _ in range(n)]
    return ids, [[0] * (len(x) // 2) + [1] * (len(x) - len(x) // 2) for x in ids]


def loaded(family_dirs, family: str, attn: str = "sdpa", coef: float | None = None):
    attention.register()
    path = family_dirs(family) / "model"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    head.install_chunked_head(model, 16)
    return model, moe.install(model, model.config, coef)


def step_of(model, recorder, columns, rows, layout, accumulation):
    """One loop step over `rows` (lists of pieces), in `accumulation` micro-batches."""
    from loop.data.batches import Step

    per = -(-len(rows) // accumulation)
    micro = [collate(columns, rows[i : i + per], 0, layout) for i in range(0, len(rows), per)]
    pieces = [p for row in rows for p in row]
    trained = sum(int(columns.trained[columns.offsets[i] + s + 1 : columns.offsets[i] + e].sum()) for i, s, e in pieces)
    step = Step(0, micro, len(rows), trained, [e - s for _, s, e in pieces])
    optimizer = Capture(model.parameters(), lr=0.0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=len(micro))
    timers = lambda name, host=False: contextlib.nullcontext()  # noqa: E731
    return train_step(model, optimizer, accelerator, step, SFT, 0.0, timers, False, recorder), optimizer


@pytest.mark.parametrize("family", MOE)
def test_for_one_dialogue_the_total_and_its_gradient_are_transformers_loss(family_dirs, family):
    model, recorder = loaded(family_dirs, family)
    assert model.config.output_router_logits and recorder.router.coef == model.config.router_aux_loss_coef > 0
    ids, mask = dialogues(model.config.vocab_size, 1)
    columns = Columns.from_lists(ids, mask)
    result, optimizer = step_of(model, recorder, columns, [[(0, 0, len(ids[0]))]], "mask", 1)

    model.zero_grad()
    labels = torch.tensor([[t if m else IGNORE for t, m in zip(ids[0], mask[0])]])
    plain = AutoModelForCausalLM.from_pretrained(family_dirs(family) / "model", dtype=torch.float32,
                                                 attn_implementation="sdpa")
    plain.load_state_dict(model.state_dict())
    reference = plain(torch.tensor(ids), labels=labels, output_router_logits=True)
    reference.loss.backward()
    total = result.loss + recorder.router.coef * result.statistics["aux_loss"]
    assert result.statistics["aux_loss"] == pytest.approx(reference.aux_loss.item(), rel=1e-5)
    assert total == pytest.approx(reference.loss.item(), rel=1e-5)
    theirs = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(optimizer.grads[id(p)], theirs[name].grad, rtol=1e-4, atol=1e-6), name
    assert len(result.routing.shares) == recorder.layers and all(abs(sum(s) - 1) < 1e-6 for s in result.routing.shares)


@pytest.mark.parametrize("attn, layout, accumulation", [("sdpa", "mask", 1), ("sdpa", "mask", 3),
                                                        ("sdpa_varlen", "varlen", 2)])
def test_the_step_value_counts_every_real_token_once_however_the_step_is_split(family_dirs, attn, layout,
                                                                               accumulation):
    """Two dialogues packed into one row, two alone (padded in the mask layout): the step's balancing loss
    is transformers' over the tokens of all of them, each dialogue run alone (no padding, no neighbour)."""
    model, recorder = loaded(family_dirs, "qwen3_moe", attn)
    ids, mask = dialogues(model.config.vocab_size, 4, seed=1)
    columns = Columns.from_lists(ids, mask)
    rows = [[(0, 0, len(ids[0])), (1, 0, len(ids[1]))], [(2, 0, len(ids[2]))], [(3, 0, len(ids[3]))]]
    result, _ = step_of(model, recorder, columns, rows, layout, accumulation)
    plain = AutoModelForCausalLM.from_pretrained(family_dirs("qwen3_moe") / "model", dtype=torch.float32)
    with torch.no_grad():
        per_dialogue = [plain(torch.tensor([x]), output_router_logits=True).router_logits for x in ids]
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    layers = tuple(torch.cat([d[layer] for d in per_dialogue]) for layer in range(recorder.layers))
    expected = load_balancing_loss_func(layers, recorder.router.experts, recorder.router.top_k)
    assert result.statistics["aux_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_a_zero_coefficient_trains_no_balancing_and_says_so(family_dirs):
    model, recorder = loaded(family_dirs, "qwen3_moe", coef=0.0)
    assert "off (model.router_aux_loss_coef)" in recorder.router.describe()
    ids, mask = dialogues(model.config.vocab_size, 1)
    result, optimizer = step_of(model, recorder, Columns.from_lists(ids, mask), [[(0, 0, len(ids[0]))]], "mask", 1)
    gate = next(p for n, p in model.named_parameters() if n.endswith("layers.0.mlp.gate.weight"))
    model.zero_grad()
    batch = to_device(collate(Columns.from_lists(ids, mask), [[(0, 0, len(ids[0]))]], 0), "cpu")
    plain_ce = head.summed_cross_entropy(model, batch)
    plain_ce.backward()
    assert result.statistics["aux_loss"] > 0  # still measured
    assert torch.allclose(optimizer.grads[id(gate)], gate.grad / sum(mask[0][1:]), rtol=1e-4, atol=1e-7)


def test_a_dense_model_has_no_router(family_dirs):
    model, recorder = loaded(family_dirs, "qwen3")
    assert recorder is None


def test_an_unknown_router_is_refused_in_one_line_before_any_weight_loads(tiny_dir, tmp_path, capsys):
    """DeepSeek-V3's router (sigmoid scores, a bias that balances without a loss): a folder with its config
    alone, no weights and no tokenizer, is refused with exit 2 and one line, nothing written."""
    config = AutoConfig.for_model("deepseek_v3", num_hidden_layers=2, hidden_size=64, n_routed_experts=8,
                                  num_experts_per_tok=2, vocab_size=100)
    with pytest.raises(ConfigError, match="router the loop does not know"):
        architecture.check_trainable(config, Config(), "sdpa")
    config.save_pretrained(tmp_path / "model")
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       model={"name_or_path": str(tmp_path / "model")})
    assert run_in_process(cfg, entry="run") == 2
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "error:" in line]
    assert "deepseek_v3 is a mixture of experts whose router the loop does not know" in line
    assert "Traceback" not in out and not (tmp_path / "out").exists()
