"""Fine-tune a StarCoder-family model on dialogues: Accelerate + DeepSpeed ZeRO-3, no Trainer.

    accelerate launch --config_file accelerate_configs/zero3.yaml loop/train.py configs/RUN.yaml [--key value]

The story, in order: config, data, model, prepare, resume, loop (step, log, eval, sample, save),
final model. Each concern lives in its own module; this file only tells the order.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType, InitProcessGroupKwargs
from accelerate.utils import set_seed
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

if __package__ in (None, ""):  # run as a script: `loop/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loop import checkpoints, config, data, hub, metrics, optim, packing, sampling, templates  # noqa: E402
from loop.checkpoints import LoopState  # noqa: E402

# DeepSpeed calls torch.distributed APIs that torch marks deprecated, once per collective.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was written; requeue the job to continue.


def make_accelerator(cfg: config.Config) -> Accelerator:
    kwargs = []
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        # On CPU accelerate leaves the backend unset and every rank thinks it is alone.
        kwargs.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(log_with="tensorboard", project_dir=cfg.output.output_dir,
                              gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
                              kwargs_handlers=kwargs)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        t = cfg.training
        accelerator.state.deepspeed_plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * accelerator.num_processes,
            "gradient_clipping": t.max_grad_norm,
        })
    return accelerator


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed cross-entropy over trained positions (targets are already shifted, -100 elsewhere).

    Everything else in the batch (position ids, the mask or the varlen lengths) goes to the model.
    """
    logits = model(**{k: v for k, v in batch.items() if k != "targets"}).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                           ignore_index=packing.IGNORE, reduction="sum")


def backward(accelerator: Accelerator, model, loss: torch.Tensor, last: bool, timers: metrics.Timers) -> None:
    """Backward of one micro-batch; on the last one, the optimizer step (timed apart).

    DeepSpeed's engine steps right after the boundary backward, so it is driven directly here,
    exactly as accelerate's own wrapper does, to time the step on its own.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        model.set_gradient_accumulation_boundary(last)
        with timers("forward_backward"):
            model.backward(loss)
        if last:
            with timers("optimizer"):
                model.step()
    else:
        accelerator.sync_gradients = last
        with timers("forward_backward"):
            accelerator.backward(loss)


def train_step(model, optimizer, accelerator: Accelerator, micro_batches: list[dict], n_trained: int,
               t: config.TrainingConfig, timers: metrics.Timers) -> tuple[float, float, bool]:
    """One optimizer step over this process's micro-batches: (loss, grad norm, poisoned).

    After each forward, every process learns whether any loss is non-finite before any backward
    runs; if one is, no process steps and the accumulated gradients are dropped (poisoned=True).
    """
    world = accelerator.num_processes
    # The engine divides by the accumulation steps and averages over processes; scaling by
    # world * accumulation / trained tokens makes the gradient the mean over every trained
    # token of the whole step, not a mean of per-micro-batch means.
    scale = world * t.gradient_accumulation_steps / max(1, n_trained)
    step_loss = torch.zeros((), device=accelerator.device)
    for m, batch in enumerate(micro_batches):
        batch = to_device(batch, accelerator.device)
        with timers("forward_backward"):
            s = loss_sum(model, batch)
        if checkpoints.any_process(accelerator, not torch.isfinite(s).item()):
            (model.optimizer if accelerator.distributed_type == DistributedType.DEEPSPEED else optimizer).zero_grad()
            return float("nan"), float("nan"), True
        backward(accelerator, model, s * scale, m == len(micro_batches) - 1, timers)
        step_loss += s.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or math.inf)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        with timers("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    loss = accelerator.reduce(step_loss, reduction="sum").item() / max(1, n_trained)
    return loss, float(grad_norm) if grad_norm is not None else float("nan"), False


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, accelerator: Accelerator, rows: list, ids: list, masks: list, batch_size: int,
             collate: Callable) -> float:
    """Token-weighted eval loss over all rows, every process taking its share (and fillers)."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for b in range(-(-len(rows) // (world * batch_size))):
        start = (b * world + rank) * batch_size
        batch_rows = [rows[j] if j < len(rows) else [] for j in range(start, start + batch_size)]
        batch = to_device(collate(batch_rows, ids, masks), accelerator.device)
        total[0] += loss_sum(model, batch).double()
        total[1] += (batch["targets"] != packing.IGNORE).sum()
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def samples(model, accelerator: Accelerator, tokenizer, cfg: config.Config, stop_id: int) -> list[str]:
    """Greedy answers to the configured prompts; every process runs generate (ZeRO-3 needs it)."""
    conversations = [[{"role": "user", "content": p}] for p in cfg.training.sample_prompts]
    synced = accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.DEEPSPEED
    return sampling.answer(accelerator.unwrap_model(model), tokenizer, conversations,
                           sampling.SamplingConfig(max_new_tokens=cfg.training.max_new_tokens),
                           stop_id, synced_gpus=synced)


def main(argv: list[str] | None = None) -> int:
    # 1. Config: everything is checked before any work starts.
    cfg = config.from_argv(argv)
    model_config = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                              trust_remote_code=cfg.model.trust_remote_code)
    context = getattr(model_config, "n_positions", None) or model_config.max_position_embeddings
    config.check_against_model(cfg, context)
    packing.check_attention(cfg.data.packing, cfg.model.attn_implementation)
    out = Path(cfg.output.output_dir)
    accelerator = make_accelerator(cfg)
    log = metrics.setup_logging(out, accelerator.is_main_process)
    set_seed(cfg.training.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.is_main_process:
        config.save(cfg, out / "config.yaml")

    # 2. Tokenizer and data: template, validation, tokenization (cached), packing plan.
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                              trust_remote_code=cfg.model.trust_remote_code)
    vocab_grew, end_token = templates.install(tokenizer, cfg.data.template)
    with accelerator.main_process_first():
        train_ds, eval_ds, report = data.prepare(cfg.data, tokenizer)
    ids, masks = train_ds["input_ids"], train_ds["assistant_mask"]
    eval_ids, eval_masks = eval_ds["input_ids"], eval_ds["assistant_mask"]
    rows = packing.plan_rows([len(x) for x in ids], cfg.data.seq_len, cfg.data.packing)
    eval_rows = packing.plan_rows([len(x) for x in eval_ids], cfg.data.seq_len, cfg.data.packing)
    pack_eff = packing.efficiency(rows, cfg.data.seq_len)
    t = cfg.training
    rows_per_step = world * t.micro_batch_size * t.gradient_accumulation_steps
    per_epoch = packing.steps_per_epoch(len(rows), rows_per_step)
    total_steps = t.max_steps or per_epoch * t.num_epochs
    log.info(f"data: {report.dialogues} dialogues ({len(ids)} train, {len(eval_ids)} eval), "
             f"skipped {dict(report.skipped)}, truncated {report.truncated}, dropped {report.dropped_too_long}; "
             f"{len(rows)} rows of {cfg.data.seq_len} ({pack_eff:.1%} full); "
             f"{per_epoch} steps/epoch, {total_steps} steps")

    # 3. Model and optimizer.
    attention, fallback = packing.resolve_attention(cfg.model.attn_implementation)
    if fallback:
        log.warning(fallback)
    packing.register_attention()
    collate = functools.partial(packing.make_batch, pad_id=tokenizer.pad_token_id, packing_mode=cfg.data.packing,
                                attention=attention)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=attention)
    if vocab_grew:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.generation_config = checkpoints.chat_generation_config(tokenizer, end_token)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(optim.param_groups(model, t), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=t.adam_eps)

    # 4. Prepare: DeepSpeed wraps model and optimizer (ZeRO-3 shards them across processes).
    model, optimizer = accelerator.prepare(model, optimizer)

    # 5. Resume: model, optimizer, RNG and loop state; the data position is a step number.
    state = LoopState(world_size=world)
    ckpt_root = out / "checkpoints"
    spec = cfg.output.resume_from_checkpoint
    if spec == "latest" and not checkpoints.complete_checkpoints(ckpt_root):
        log.info(f"--resume_from_checkpoint latest: no complete checkpoint under {ckpt_root} yet; starting fresh")
    elif spec:
        path = checkpoints.find(spec, ckpt_root)
        state = checkpoints.load(accelerator, path)
        log.info(f"resumed from {path} at step {state.step}")
    accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": state.step}})
    summary = {"world_size": world, "hardware": metrics.hardware(world), "license": cfg.output.license}

    def eval_and_log() -> None:
        eval_loss = evaluate(model, accelerator, eval_rows, eval_ids, eval_masks, t.micro_batch_size, collate)
        accelerator.log({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50))}, step=state.step)
        log.info(f"step {state.step}: eval loss {eval_loss:.4f}")
        summary["eval_loss"] = eval_loss

    if state.step == 0:
        accelerator.log(report.as_scalars() | {"data/packing_efficiency": pack_eff}, step=0)
        if eval_rows:  # the starting point of the eval curve
            eval_and_log()

    preempted: list[int] = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda signum, _frame: preempted.append(signum))
    peak = metrics.peak_flops_per_device(t.peak_flops_per_device)
    stop_id = tokenizer.convert_tokens_to_ids(end_token)
    n_layer, d_model = model_config.n_layer, model_config.n_embd
    timers, window = metrics.Timers(), {"tokens": 0, "trained": 0, "flops": 0.0, "loss": 0.0, "steps": 0}
    window_start = time.perf_counter()
    found = checkpoints.complete_checkpoints(ckpt_root)
    last_good = str(found[-1]) if found else "none"
    uploader = None
    if cfg.output.push_to_hub and cfg.output.hub_push_checkpoints and accelerator.is_main_process:
        uploader = hub.BackgroundUploader(cfg.output.hub_model_id, cfg.output.hub_private, out)
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train")
    model.train()

    # 6. The loop: one iteration is one optimizer step of `gradient_accumulation_steps` micro-batches.
    while state.step < total_steps:
        epoch, step_in_epoch = divmod(state.step, per_epoch)
        order = packing.epoch_order(len(rows), t.seed, epoch)
        with timers("data"):
            step_row_ids = [[packing.step_rows(order, step_in_epoch, m, r, world, t.micro_batch_size,
                                               t.gradient_accumulation_steps)
                             for m in range(t.gradient_accumulation_steps)] for r in range(world)]
            all_rows = [rows[j] for per_rank in step_row_ids for micro in per_rank for j in micro if j is not None]
            n_trained = sum(packing.trained_tokens(row, masks) for row in all_rows)
            micro_batches = [collate([rows[j] if j is not None else [] for j in micro], ids, masks)
                             for micro in step_row_ids[rank]]
        lr = optim.lr_at(state.step, total_steps, t)
        optim.set_lr(optimizer, lr)
        loss, grad_norm, poisoned = train_step(model, optimizer, accelerator, micro_batches, n_trained, t, timers)
        if poisoned or not math.isfinite(grad_norm):
            what = "loss" if poisoned else f"gradient norm ({grad_norm})"
            if t.on_nonfinite == "stop" or not poisoned:
                applied = "" if poisoned else " (the update was already applied: resume from the checkpoint)"
                raise FloatingPointError(f"non-finite {what} at step {state.step + 1}{applied}; "
                                         f"last good checkpoint: {last_good}")
            state.skipped_steps += 1
            log.warning(f"step {state.step + 1}: non-finite loss, optimizer step skipped "
                        f"({state.skipped_steps} so far)")
            accelerator.log({"train/skipped_steps": state.skipped_steps}, step=state.step + 1)
        state.step += 1
        state.epoch, state.step_in_epoch = divmod(state.step, per_epoch)
        pieces = [e - s_ for row in all_rows for _, s_, e in row]  # dialogue lengths in this step
        step_tokens = sum(pieces)
        state.tokens_seen += step_tokens
        state.samples_seen += len(all_rows)
        window["tokens"] += step_tokens
        if not poisoned:
            state.tokens_trained += n_trained
            window["trained"] += n_trained
            window["loss"] += loss
            window["steps"] += 1
        window["flops"] += metrics.training_flops(n_params, n_layer, d_model, pieces)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

        if state.step % t.log_every == 0 or state.step == total_steps:
            elapsed = time.perf_counter() - window_start
            scalars = {"train/loss": window["loss"] / max(1, window["steps"]), "train/lr": lr,
                       "train/grad_norm": grad_norm, "train/epoch": state.step / per_epoch,
                       "throughput/tokens_per_s": window["tokens"] / elapsed,
                       "throughput/tokens_per_s_per_device": window["tokens"] / elapsed / world,
                       "throughput/trained_tokens_per_s": window["trained"] / elapsed,
                       "throughput/trained_tokens_per_s_per_device": window["trained"] / elapsed / world,
                       "throughput/packing_efficiency": pack_eff,
                       "memory/peak_bytes": metrics.peak_memory_bytes(),
                       "progress/tokens_trained": state.tokens_trained}
            scalars |= {f"time/{k}": v / max(1, window["steps"]) for k, v in timers.pop().items()}
            if peak:
                scalars["throughput/mfu"] = window["flops"] / elapsed / world / peak
            accelerator.log(scalars, step=state.step)
            log.info(" ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
            summary["train_loss"] = scalars["train/loss"]
            window = dict.fromkeys(window, 0)
            window_start = time.perf_counter()
        if (t.eval_every and state.step % t.eval_every == 0) or state.step == total_steps:
            eval_and_log()
        if t.sample_prompts and ((t.sample_every and state.step % t.sample_every == 0)
                                 or state.step == total_steps):
            answers = samples(model, accelerator, tokenizer, cfg, stop_id)
            text = "\n\n".join(f"**{p}**\n\n{a}" for p, a in zip(t.sample_prompts, answers))
            accelerator.log({"samples": text}, step=state.step)
            if accelerator.is_main_process:
                (out / "samples.md").write_text(f"# Samples at step {state.step}\n\n{text}\n")
        stop_now = checkpoints.any_process(accelerator, bool(preempted))
        if cfg.output.save and (state.step % t.save_every == 0 or state.step == total_steps or stop_now):
            last_good = str(checkpoints.save(accelerator, state, cfg, ckpt_root, model, tokenizer))
            log.info(f"checkpoint {last_good}")
            if uploader:
                uploader.submit(Path(last_good))
        if stop_now:
            saved = f"checkpoint {last_good} written" if cfg.output.save else "nothing saved (output.save: false)"
            log.warning(f"preempted (signal {preempted or 'on another process'}) at step {state.step}; "
                        f"{saved}; resume with --resume_from_checkpoint latest")
            accelerator.wait_for_everyone()
            accelerator.end_training()
            return PREEMPTED_EXIT_CODE
    bar.close()

    # 7. Final model: safetensors + config + tokenizer (with chat template) + generation config.
    if not cfg.output.save:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return 0
    checkpoints.save_model(accelerator, model, tokenizer, out / "final", cfg.output.save_dtype)
    log.info(f"final model saved to {out / 'final'}")
    if accelerator.is_main_process:
        summary |= {"steps": state.step, "tokens_trained": state.tokens_trained, "tokens_seen": state.tokens_seen}
        example = [{"role": "user", "content": "How do I reverse a list?"}]
        card = hub.model_card(cfg, summary, tokenizer.chat_template, templates.render(tokenizer, example, True))
        card.save(out / "final" / "README.md")
        if uploader:
            for failure in uploader.close():
                log.warning(f"checkpoint upload failed: {failure}")
        if cfg.output.push_to_hub:
            hub.upload(out / "final", cfg.output.hub_model_id, cfg.output.hub_private,
                       message=f"Final model after {state.step} steps")
    accelerator.wait_for_everyone()  # without it, 2-process runs sometimes abort at exit
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
