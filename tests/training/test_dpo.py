"""Preference tuning: each sequence's log-probability packed equals it alone for every attention choice, the
losses are DPO's, conservative DPO's and TRL's IPO, and a step is the mean over every pair of the step for
any split into processes and accumulation steps (real 2-process ZeRO-3 against plain transformers)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loop.config import DpoSettings
from loop.data import batches, pairs, preference
from loop.model import architecture, attention, head
from loop.training import dpo
from tests.conftest import FAMILIES, launch, scalars, write_config
from tests.model.test_attention import CHOICES, models_with


def corpus_pairs(dialogues, n: int) -> list:
    """n pairs of uneven lengths made from a family's corpus (the longest and shortest dialogues, mixed)."""
    by_length = sorted({json.dumps(d): d for d in dialogues}.values(), key=lambda d: len(json.dumps(d)))
    chosen = [d for two in zip(by_length[: n // 2], by_length[-(n // 2):]) for d in two]
    made = preference.from_dialogues({"all": chosen}, "other_topic", 1)
    return [preference.recognise(record) for record in made]


def alone(model, ids: list[int], mask: list[int]) -> torch.Tensor:
    """A sequence's summed completion log-probability, run alone through plain transformers."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logp[torch.tensor(mask[1:], dtype=torch.bool)].sum()


# Both layouts for every family; torch's varlen kernel (faked on CPU, both signatures) on the windowed one.
PACKED = [(f, c) for f in FAMILIES for c in CHOICES[:2]] + [("starcoder2", c) for c in CHOICES[2:]]


@pytest.mark.parametrize("family, choice", PACKED)
def test_each_sequences_log_prob_packed_equals_it_alone(prepared, monkeypatch, family, choice):
    """Pairs packed best-fit-decreasing into rows (two past the 64-token sliding windows), log-probabilities
    through the chunked head, against each sequence alone with the model's own masking."""
    model_dir, tokenizer, dialogues = prepared(family)
    model, plain, impl = models_with(choice, model_dir, monkeypatch)
    head.install_chunked_head(model, chunk_tokens=50)
    ds = preference.tokenize(corpus_pairs(dialogues, 12), tokenizer, 512, DpoSettings(), "truncate")
    columns = batches.Columns.from_dataset(ds)
    rows = pairs.plan_rows(columns.lengths(), 512, "bfd")
    assert len(rows) < 12 and max(columns.lengths()) > 64
    layout = attention.layout(impl, "bfd")
    batch = pairs.pair_keys()(batches.collate(columns, [*rows, []], 0, layout,
                                              mask_windows=architecture.Shape.of(model.config).mask_windows()),
                              [*rows, []])
    with torch.no_grad():
        packed = dpo.sequence_log_probs(model, batches.to_device(batch, "cpu"))
        expected = torch.stack([alone(plain, ds[i]["input_ids"], ds[i]["assistant_mask"])
                                for i in batch["sequence_ids"].tolist()])
    assert sorted(batch["sequence_ids"].tolist()) == list(range(len(columns)))
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=2e-4)


def test_the_losses_are_dpo_conservative_dpo_and_trls_ipo():
    policy = torch.tensor([-10.0, -12.0, -30.0, -29.0])  # two pairs: chosen, rejected, chosen, rejected
    ref = torch.tensor([-11.0, -11.0, -30.5, -28.0])
    tokens = torch.tensor([4, 5, 10, 8])
    margins = torch.tensor([(1.0 - -1.0), (0.5 - -1.0)])  # log-ratio of chosen minus rejected's
    losses, chosen, rejected = dpo.pair_losses(policy, ref, tokens, DpoSettings(beta=0.1))
    torch.testing.assert_close(losses, -F.logsigmoid(0.1 * margins))
    torch.testing.assert_close(chosen, torch.tensor([0.1, 0.05])) and torch.testing.assert_close(
        rejected, torch.tensor([-0.1, -0.1]))
    smoothed, _, _ = dpo.pair_losses(policy, ref, tokens, DpoSettings(beta=0.1, label_smoothing=0.2))
    torch.testing.assert_close(smoothed, -0.8 * F.logsigmoid(0.1 * margins) - 0.2 * F.logsigmoid(-0.1 * margins))
    ipo, _, _ = dpo.pair_losses(policy, ref, tokens, DpoSettings(beta=0.25, loss="ipo"))
    per_token = torch.tensor([1.0 / 4 - -1.0 / 5, 0.5 / 10 - -1.0 / 8])  # TRL: log-ratios per completion token
    torch.testing.assert_close(ipo, (per_token - 1 / (2 * 0.25)) ** 2)


WORLD, MICRO, ACCUM, PAIRS = 2, 2, 4, 16  # every row of the 16 pairs fits one step: 2 steps are 2 epochs


def pair_loss(margin_logits, tokens, settings: dict) -> torch.Tensor:
    """The loss of one pair written out from the papers (independent of loop/training/dpo.py)."""
    (dc, dr), (nc, nr) = margin_logits, tokens
    beta, e = settings.get("beta", 0.1), settings.get("label_smoothing", 0.0)
    if settings.get("loss") == "ipo":
        return (dc / nc - dr / nr - 1 / (2 * beta)) ** 2
    return -(1 - e) * F.logsigmoid(beta * (dc - dr)) - e * F.logsigmoid(-beta * (dc - dr))


@pytest.mark.parametrize("family, attn, chunk, settings", [
    ("gpt_bigcode", "sdpa_varlen", 100, {"loss": "sigmoid", "label_smoothing": 0.1}),
    ("starcoder2", "sdpa", 64, {"loss": "ipo", "beta": 0.5})])
def test_two_steps_under_zero3_equal_plain_transformers_on_every_pair(prepared, tiny_dir, tmp_path, family, attn,
                                                                       chunk, settings):
    """2 processes x 4 accumulation steps x 2 rows of packed pairs (some micro-batches fillers), the
    projection's weight partitioned by ZeRO-3 and gathered for the chunked log-probabilities: the loss,
    gradient norm and weights of two optimizer steps equal plain transformers computing every sequence alone
    and one mean over all pairs; the reference pass equals the model at step 0 bit for bit."""
    model_dir, tokenizer, dialogues = prepared(family)
    chosen = corpus_pairs(dialogues, PAIRS)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in chosen))
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       model={"name_or_path": str(model_dir), "attn_implementation": attn},
                       data={"train_files": [str(path)], "eval_files": [str(path)], "seq_len": 512,
                             "cache_dir": str(tmp_path / "cache")},
                       training={"objective": "dpo", "max_steps": 2, "micro_batch_size": MICRO,
                                 "gradient_accumulation_steps": ACCUM, "lr": 1e-3, "warmup_steps": 0,
                                 "lr_schedule": "constant", "max_grad_norm": 0.0, "log_every": 1,
                                 "loss_chunk_tokens": chunk},
                       dpo=settings, output={"save_dtype": "fp32"})
    launch(cfg, nproc=WORLD, mixed_precision="no")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = preference.tokenize(chosen, tokenizer, 512, DpoSettings(**settings), "truncate")
    ids, masks = ds["input_ids"], ds["assistant_mask"]
    rows = pairs.plan_rows([len(x) for x in ids], 512, "bfd")
    assert len(rows) <= WORLD * MICRO * ACCUM and len({len(r) for r in rows}) > 1  # one step; rows of 2+ pairs
    tokens = torch.tensor([sum(m) for m in masks], dtype=torch.float32)
    with torch.no_grad():
        reference = torch.stack([alone(model, i, m) for i, m in zip(ids, masks)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    grad_norm = lambda: torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()  # noqa: E731
    expected = []
    for step in range(2):
        ratio = torch.stack([alone(model, i, m) for i, m in zip(ids, masks)]) - reference
        losses = torch.stack([pair_loss(ratio[2 * k : 2 * k + 2], tokens[2 * k : 2 * k + 2], settings)
                              for k in range(PAIRS)])
        if step == 0:  # what a mean of per-micro-batch means would give (micro-batches hold 1 to 4+ pairs)
            columns = batches.Columns.from_dataset(ds)
            groups = [b["sequence_ids"][0::2].div(2, rounding_mode="floor").tolist() for rank in range(WORLD)
                      for b in batches.Planner(rows, columns, 0, "mask", True, 42, WORLD, rank, MICRO, ACCUM,
                                               extra=pairs.pair_keys())(0).micro_batches]
            assert sorted(k for g in groups for k in g) == list(range(PAIRS)) and len({len(g) for g in groups}) > 2
            optimizer.zero_grad()
            (sum(losses[g].mean() for g in groups if g) / len(groups)).backward(retain_graph=True)
            naive = grad_norm()
        loss = losses.mean()
        optimizer.zero_grad()
        loss.backward()
        expected.append((loss.item(), grad_norm()))
        if step == 0:
            first = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    assert abs(naive - expected[0][1]) > 2e-2 * expected[0][1]  # the test can tell the two apart

    logged = scalars(tmp_path / "out")
    for step, (loss, norm) in enumerate(expected, start=1):
        assert dict(logged["train/loss"])[step] == pytest.approx(loss, rel=1e-4)
        assert dict(logged["train/grad_norm"])[step] == pytest.approx(norm, rel=1e-3)
    at_zero = 1 / (4 * settings["beta"] ** 2) if settings.get("loss") == "ipo" else math.log(2)
    assert dict(logged["eval/loss"])[0] == pytest.approx(at_zero, rel=1e-6)  # the reference is the model itself
    assert dict(logged["eval/rewards/margins"])[0] == 0.0 and dict(logged["eval/rewards/accuracies"])[0] == 0.0
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final", dtype=torch.float32)
    ref_state = model.state_dict()
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    left_out = moved = 0
    for name, value in trained.state_dict().items():
        # A first gradient far below Adam's eps (under 1e-8: terms that cancel, such as a key bias's, or a prompt
        # token past the sliding windows) is float noise, 0 or 1e-10, which Adam's second step turns into an
        # update of its own: those few weights are left out of the comparison.
        steady = first[name].abs() > 1e-8 if name in first else torch.ones_like(value, dtype=torch.bool)
        changed = (value != start[name]) | (ref_state[name] != start[name])
        left_out, moved = left_out + int((changed & ~steady).sum()), moved + int(changed.sum())
        # 5e-5 is 2.5% of one Adam step (lr 1e-3): a wrong gradient moves a weight by a whole step, float noise
        # through Adam's division by a small second moment by a few hundredths of one (2.7e-5 once in 262,089).
        torch.testing.assert_close(value[steady], ref_state[name][steady], rtol=0, atol=5e-5, msg=name)
    assert left_out < 1e-2 * moved, (left_out, moved)
