"""The loss is the mean over every trained token of an optimizer step, across micro-batches and
processes: checked under real 2-process ZeRO-3 against plain PyTorch on one process."""

import json

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loop import data, packing
from tests.conftest import launch, write_config
from tests.test_train import scalars

WORLD, MICRO, ACCUM = 2, 2, 4  # 16 dialogues = exactly one optimizer step


def dialogue_loss_sum(model, ids, mask):
    """Summed cross-entropy of one dialogue run alone, over its trained tokens (independent of the loop)."""
    ids_t = torch.tensor([ids])
    logits = model(ids_t).logits[0, :-1].float()
    target = torch.tensor(ids[1:])
    trained = torch.tensor(mask[1:], dtype=torch.bool)
    return F.cross_entropy(logits[trained], target[trained], reduction="sum"), int(trained.sum())


def test_one_accumulated_step_equals_one_big_batch(tiny_dir, tokenizer, corpus, tmp_path):
    # Uneven on purpose: the longest and shortest dialogues, interleaved.
    by_len = sorted(corpus, key=lambda d: len(json.dumps(d)))
    chosen = [d for pair in zip(by_len[:8], by_len[-8:]) for d in pair]
    path = tmp_path / "step.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in chosen))
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       data={"train_files": [str(path)], "eval_files": [str(path)], "packing": "pad",
                             "seq_len": 512},
                       training={"max_steps": 1, "micro_batch_size": MICRO, "gradient_accumulation_steps": ACCUM,
                                 "lr": 1e-3, "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.0,
                                 "max_grad_norm": 0.0, "log_every": 1},
                       output={"save_dtype": "fp32"})
    launch(cfg, nproc=WORLD, mixed_precision="no")

    # Reference: one process, plain PyTorch, every dialogue alone, one mean over all trained tokens.
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    ds = data.tokenize(chosen, tokenizer, seq_len=512, on_too_long="drop")
    ids, masks = ds["input_ids"], ds["assistant_mask"]
    sums, counts = zip(*(dialogue_loss_sum(model, i, m) for i, m in zip(ids, masks)))
    loss = sum(sums) / sum(counts)
    loss.backward(retain_graph=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()

    # What a mean of per-micro-batch means would give on the loop's own micro-batches.
    order = packing.epoch_order(len(ids), seed=42, epoch=0)
    micro_means = []
    for micro in range(ACCUM):
        for rank in range(WORLD):
            rows = packing.step_rows(order, 0, micro, rank, WORLD, MICRO, ACCUM)
            micro_means.append(sum(sums[j] for j in rows) / sum(counts[j] for j in rows))
    model.zero_grad()
    (sum(micro_means) / len(micro_means)).backward()
    mom_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()

    logged = scalars(tmp_path / "out")
    run_norm = logged["train/grad_norm"][0][1]
    run_loss = logged["train/loss"][0][1]
    assert abs(run_loss - loss.item()) < 1e-4 * loss.item(), (run_loss, loss.item())
    assert abs(run_norm - ref_norm) < 1e-3 * ref_norm, (run_norm, ref_norm)
    assert abs(mom_norm - ref_norm) > 2e-2 * ref_norm, (mom_norm, ref_norm)  # the test can tell

    # The updated weights equal one AdamW step of the reference gradients.
    for n, p in model.named_parameters():
        p.grad = grads[n]
    torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0).step()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final", dtype=torch.float32)
    ref_state = model.state_dict()
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], rtol=0, atol=2e-5, msg=name)
