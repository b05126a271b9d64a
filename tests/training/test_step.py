"""The optimizer step: its loss is the mean over every trained token of the step, across micro-batches and
processes (checked under real 2-process ZeRO-3 against plain PyTorch on one process, and without DeepSpeed
under DDP), and a non-finite step is stopped at or skipped."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loop.data import packing
from loop.data.tokenize import tokenize
from tests.conftest import ROOT, free_port, launch, poisoned, scalars, write_config

WORLD, MICRO, ACCUM = 2, 2, 4  # 16 dialogues = exactly one optimizer step


def dialogue_loss_sum(model, ids, mask):
    """Summed cross-entropy of one dialogue run alone, over its trained tokens (independent of the loop)."""
    ids_t = torch.tensor([ids])
    logits = model(ids_t).logits[0, :-1].float()
    target = torch.tensor(ids[1:])
    trained = torch.tensor(mask[1:], dtype=torch.bool)
    return F.cross_entropy(logits[trained], target[trained], reduction="sum"), int(trained.sum())


@pytest.mark.parametrize("family, packing_mode, attention, chunk, engine", [
    # Each family once, each attention layout and both loss paths (packed sdpa: Starcoder2 and Qwen2).
    ("gpt_bigcode", "pad", "sdpa", 0, "zero3"), ("gpt_bigcode", "bfd", "sdpa_varlen", 100, "zero3"),
    ("starcoder2", "bfd", "sdpa", 100, "zero3"), ("llama", "bfd", "sdpa_varlen", 100, "zero3"),
    ("qwen2", "bfd", "sdpa", 100, "zero3"),
    # The second engine on the first case: the same rows give ZeRO-3's loss (both equal the hand computation).
    ("gpt_bigcode", "pad", "sdpa", 0, "fsdp2")])
def test_one_accumulated_step_equals_one_big_batch(prepared, tiny_dir, tmp_path, family, packing_mode, attention,
                                                   chunk, engine):
    """Under 2-process ZeRO-3 (the output projection's weight partitioned), with the loss computed in
    chunks of 100 tokens inside the projection or from plain logits, for every family: rotary position
    ids restart per dialogue, sliding windows (64 tokens) apply inside each, a BOS opens each. Under 2-process
    FSDP2 (every block and the embeddings sharded) the same step gives the same loss, gradient norm and
    weights, float32 and no dropout: the two engines agree on the same rows within float tolerance."""
    model_dir, tokenizer, corpus = prepared(family)
    # Uneven on purpose: the longest and shortest dialogues, interleaved.
    by_len = sorted(corpus, key=lambda d: len(json.dumps(d)))
    chosen = [d for pair in zip(by_len[:8], by_len[-8:]) for d in pair]
    path = tmp_path / "step.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in chosen))
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       model={"name_or_path": str(model_dir), "attn_implementation": attention},
                       data={"train_files": [str(path)], "eval_files": [str(path)], "packing": packing_mode,
                             "seq_len": 512},
                       training={"max_steps": 1, "micro_batch_size": MICRO, "gradient_accumulation_steps": ACCUM,
                                 "lr": 1e-3, "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.0,
                                 "max_grad_norm": 0.0, "log_every": 1, "loss_chunk_tokens": chunk,
                                 # FSDP2: generation during training too (every process joins every forward)
                                 **({"sample_prompts": ["Hello"], "max_new_tokens": 4} if engine == "fsdp2" else {})},
                       output={"save_dtype": "fp32"})
    launch(cfg, nproc=WORLD, mixed_precision="no", accelerate_config=f"cpu_{engine}.yaml")
    if engine == "fsdp2":
        assert (tmp_path / "out" / "samples.md").read_text().startswith("# Samples at step 1\n\n**Hello**")
    shared = {"zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2 (fully_shard)"}[engine]
    assert f"| distributed setup | {shared}, 2 process(es)" in (tmp_path / "out" / "final" / "README.md").read_text()

    # Reference: one process, plain PyTorch, every dialogue alone, one mean over all trained tokens.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = tokenize(chosen, tokenizer, seq_len=512, on_too_long="drop")
    ids, masks = ds["input_ids"], ds["assistant_mask"]
    sums, counts = zip(*(dialogue_loss_sum(model, i, m) for i, m in zip(ids, masks)))
    loss = sum(sums) / sum(counts)
    loss.backward(retain_graph=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()

    if packing_mode == "pad":  # what a mean of per-micro-batch means would give (a row is a dialogue)
        order = packing.epoch_order(len(ids), seed=42, epoch=0)
        micro_means = []
        for micro in range(ACCUM):
            for rank in range(WORLD):
                rows = packing.step_rows(order, 0, micro, rank, WORLD, MICRO, ACCUM)
                micro_means.append(sum(sums[j] for j in rows) / sum(counts[j] for j in rows))
        model.zero_grad()
        (sum(micro_means) / len(micro_means)).backward()
        mom_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
        assert abs(mom_norm - ref_norm) > 2e-2 * ref_norm, (mom_norm, ref_norm)  # the test can tell

    logged = scalars(tmp_path / "out")
    run_norm = logged["train/grad_norm"][0][1]
    run_loss = logged["train/loss"][0][1]
    assert abs(run_loss - loss.item()) < 1e-4 * loss.item(), (run_loss, loss.item())
    assert abs(run_norm - ref_norm) < 1e-3 * ref_norm, (run_norm, ref_norm)

    # The updated weights equal one AdamW step of the reference gradients.
    for n, p in model.named_parameters():
        p.grad = grads[n]
    torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0).step()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final", dtype=torch.float32)
    ref_state = model.state_dict()
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], rtol=0, atol=2e-5, msg=name)


def test_non_finite_loss_stops_or_skips_the_step(tiny_dir, tokenizer, corpus, tmp_path):
    """Only a dialogue longer than 100 tokens reaches the NaN rows planted in the position embeddings."""
    model_dir, short, _ = poisoned(tiny_dir, tokenizer, corpus, tmp_path, n_short=12)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"messages": d}) + "\n" for d in short[:4]))

    def run(mode):
        out = tmp_path / mode
        cfg = write_config(tmp_path / f"{mode}.yaml", tiny_dir, out,
                           model={"name_or_path": str(model_dir)},
                           data={"train_files": [str(tmp_path / "train.jsonl")],
                                 "eval_files": [str(tmp_path / "eval.jsonl")], "packing": "pad"},
                           training={"max_steps": 4, "micro_batch_size": 1, "gradient_accumulation_steps": 2,
                                     "save_every": 1, "log_every": 1, "on_nonfinite": mode})
        return out, launch(cfg, check=False)

    out, proc = run("skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss, optimizer step skipped (1 so far)" in (out / "train.log").read_text()
    assert [v for _, v in scalars(out)["train/skipped_steps"]] == [1]
    trained = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    for name, p in trained.named_parameters():
        values = p[:100] if name == "transformer.wpe.weight" else p
        assert torch.isfinite(values).all(), name  # no NaN reached the weights
    assert json.loads((out / "checkpoints" / "step_00000004" / "loop_state.json").read_text())["skipped_steps"] == 1

    out, proc = run("stop")
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "non-finite loss at step" in said and "last good checkpoint: " in said


def test_without_deepspeed_two_processes_train_as_one_and_resume_exactly(tiny_dir, tmp_path):
    """Data parallel without DeepSpeed (torchrun, DDP over gloo): 2 processes x 2 micro-batches give the
    loss and gradient norm of 1 process x 4, step by step (the same rows, the same mean over tokens); and
    2 processes resumed from their step-2 checkpoint end with the same weights, bit for bit."""
    def run(name, processes, accumulation, *overrides):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_dir, tmp_path / name, data={"eval_fraction": 0},
                           training={"max_steps": 3, "log_every": 1, "save_every": 2,
                                     "gradient_accumulation_steps": accumulation})
        cmd = [sys.executable, "loop/train.py", str(cfg), *overrides]
        if processes > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), *cmd[1:]]
        env = os.environ | {"ACCELERATE_USE_CPU": "true"}  # DDP over gloo, as accelerate's MULTI_CPU
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return scalars(tmp_path / name)

    two, one = run("two", 2, 2), run("one", 1, 4, "--save", "false")
    for tag in ("train/loss", "train/grad_norm"):
        assert [s for s, _ in two[tag]] == [1, 2, 3]
        for (_, a), (_, b) in zip(two[tag], one[tag], strict=True):
            assert a == pytest.approx(b, rel=1e-5), tag

    checkpoint = lambda name, step: tmp_path / name / "checkpoints" / f"step_{step:08d}"  # noqa: E731
    shutil.copytree(checkpoint("two", 2), checkpoint("resumed", 2))
    run("resumed", 2, 2, "--resume_from_checkpoint", "latest")
    ended, resumed = (load_file(checkpoint(name, 3) / "model.safetensors") for name in ("two", "resumed"))  # fp32
    assert ended.keys() == resumed.keys() and all(torch.equal(ended[k], resumed[k]) for k in ended)
