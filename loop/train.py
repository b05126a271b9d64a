"""Fine-tune a StarCoder-family model on dialogues: Accelerate + DeepSpeed ZeRO-3, no Trainer.

    accelerate launch --config_file accelerate_configs/zero3.yaml loop/train.py configs/RUN.yaml [--key value]

The story, in order: config, data, model, prepare, resume, loop (step, bookkeeping, then log, eval,
sample, save), final model. Each side job lives in the module named for it; this file tells the order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType, InitProcessGroupKwargs
from accelerate.utils import set_seed
from tqdm import tqdm

from loop import (
    attention,
    batches,
    card,
    checkpoints,
    config,
    data,
    export,
    hub,
    loss,
    metrics,
    models,
    optim,
    packing,
    preemption,
    profiling,
    rundir,
    sampling,
    templates,
    usage,
)

# DeepSpeed calls torch.distributed APIs that torch marks deprecated, once per collective.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def make_accelerator(cfg: config.Config) -> Accelerator:
    kwargs = []
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():
        # On CPU accelerate leaves the backend unset and every rank thinks it is alone.
        kwargs.append(InitProcessGroupKwargs(backend="gloo"))
    named = [t for t in cfg.output.report_to if t != "tensorboard"]  # TensorBoard: metrics.start_trackers
    with contextlib.redirect_stdout(io.StringIO()) as said:  # DeepSpeed prints "... built successfully" each start
        accelerator = Accelerator(log_with=named or None, project_dir=cfg.output.output_dir,
                                  gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
                                  kwargs_handlers=kwargs)
    kept = [line for line in said.getvalue().splitlines() if "built successfully" not in line]
    if kept:
        print("\n".join(kept))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.distributed_type == DistributedType.NO:
        raise config.ConfigError(f"{launched} processes were launched but accelerate set up no distributed training, "
                                 "so each would train alone into the same output_dir (without GPUs, `accelerate launch "
                                 "--multi_gpu` and plain torchrun do this); launch with a config from "
                                 "accelerate_configs/, or one process")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        deepspeed_settings(plugin.deepspeed_config, cfg.training, accelerator.num_processes)
        plugin.set_deepspeed_weakref()  # transformers' zero.Init reads a copy accelerate made before the settings
    return accelerator


def deepspeed_settings(ds: dict, t: config.TrainingConfig, processes: int) -> None:
    """Fill in the DeepSpeed config accelerate built: the batch from the run config, and the defaults
    that cost throughput (unless the DeepSpeed config sets them itself)."""
    ds.update({"train_micro_batch_size_per_gpu": t.micro_batch_size,
               "gradient_accumulation_steps": t.gradient_accumulation_steps,
               "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * processes,
               "gradient_clipping": t.max_grad_norm})
    # DeepSpeed's throughput timer synchronises the device at every forward and at every step, so the
    # host cannot queue work ahead; the loop times its steps with CUDA events instead.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    zero = ds.get("zero_optimization", {})
    on_device = zero.get("offload_param", {}).get("device", "none") in ("none", None)
    if processes == 1 and zero.get("stage") == 3 and on_device:
        # One process holds every shard anyway: gathering and releasing each layer's weights around
        # every forward and backward only stalls the GPU, so every parameter stays.
        if zero.get("stage3_param_persistence_threshold", "auto") == "auto":
            zero["stage3_param_persistence_threshold"] = 2**62
            # DeepSpeed's own linear (the default) re-gathers a released weight in backward instead of
            # keeping it; nothing is released here, and torch's fuses the bias into the matmul: forward+
            # backward 218 -> 202 ms a step on an H200 (tools/bench/README.md, run 3).
            zero.setdefault("memory_efficient_linear", False)


@dataclass
class StepResult:
    loss: float | None  # mean over every trained token of the step, all processes; None: not applied
    grad_norm: torch.Tensor | float  # a device tensor, read only when logged
    nonfinite: str | None  # what was not finite when the step was not applied
    preempted: bool  # a preemption signal reached some process: all of them save and stop


def train_step(model, optimizer, accelerator: Accelerator, step: batches.Step, max_grad_norm: float,
               timers: metrics.Timers, preempted: bool) -> StepResult:
    """One optimizer step over this process's micro-batches, with one host-device synchronisation.

    The engine divides by the accumulation steps and averages over processes; scaling each summed
    micro-batch loss by world * accumulation / (trained tokens of the whole step) makes the gradient
    the mean over every trained token of the step, not a mean of per-micro-batch means. After the
    backward passes, one all-reduce gives every process the step's loss, whether any loss (or, without
    DeepSpeed, the gradient norm) was non-finite, and whether any process was signalled to stop; a
    non-finite step is dropped on every process before the optimizer runs.
    """
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    scale = accelerator.num_processes * len(step.micro_batches) / max(1, step.trained)
    agreed = torch.zeros(4, device=accelerator.device)  # loss sum, non-finite losses, non-finite norms, preemption
    for m, batch in enumerate(step.micro_batches):
        with timers("forward_backward"):
            s = loss.loss_sum(model, batches.to_device(batch, accelerator.device))
            agreed[0] += s.detach()
            agreed[1] += (~torch.isfinite(s)).float()
            if deepspeed:  # driven directly, as accelerate's wrapper does, to time the optimizer on its own
                model.set_gradient_accumulation_boundary(m == len(step.micro_batches) - 1)
                model.backward(s * scale)
            else:
                accelerator.sync_gradients = m == len(step.micro_batches) - 1
                accelerator.backward(s * scale)
    grad_norm: torch.Tensor | float = float("nan")
    if not deepspeed:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
        agreed[2] += (~torch.isfinite(grad_norm)).float()
    agreed[3].fill_(float(preempted))  # `agreed[3] = x` would copy x from pageable memory: a synchronisation
    loss_sum, bad_loss, bad_norm, stop = accelerator.reduce(agreed, reduction="sum").tolist()
    if bad_loss or bad_norm:
        (model.optimizer if deepspeed else optimizer).zero_grad()
        return StepResult(None, grad_norm, "loss" if bad_loss else "gradient norm", bool(stop))
    with timers("optimizer"):
        if deepspeed:
            model.step()
            grad_norm = model.get_global_grad_norm()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if isinstance(grad_norm, float) and not math.isfinite(grad_norm):  # DeepSpeed found it and skipped the update
        return StepResult(None, grad_norm, "gradient norm", bool(stop))
    return StepResult(loss_sum / max(1, step.trained), grad_norm, None, bool(stop))


def skip_or_stop(what: str, state: checkpoints.LoopState, policy: str, accelerator: Accelerator,
                 ckpt_root: Path) -> None:
    """A step that was not applied because something was not finite: stop the run, or count it."""
    if policy == "stop":
        raise FloatingPointError(f"non-finite {what} at step {state.step + 1}; the step was not applied; "
                                 f"last good checkpoint: {checkpoints.last_good(ckpt_root)}")
    logging.getLogger("loop").warning(f"step {state.step + 1}: non-finite {what}, optimizer step skipped "
                                      f"({state.skipped_steps + 1} so far)")
    accelerator.log({"train/skipped_steps": state.skipped_steps + 1}, step=state.step + 1)


def leave_preempted(accelerator: Accelerator, preempt: preemption.Preemption, step: int, saving: bool, ckpt_root: Path,
                    out: Path) -> int:
    """Say what was saved and how to resume, mark the run directory, and exit with the requeue code."""
    saved = checkpoints.last_good(ckpt_root) if saving else "nothing (output.save: false)"
    logging.getLogger("loop").warning(f"preempted ({preempt.describe()}) at step {step}; saved {saved}; "
                                      "resume with --resume_from_checkpoint latest")
    if accelerator.is_main_process:
        (out / rundir.PREEMPTED).write_text(f"step {step}\n")
    return finish(accelerator, preemption.PREEMPTED_EXIT_CODE)


def due(step: int, every: int, last: int) -> bool:
    """Every `every` steps (0: never) and at the last step."""
    return step == last or (every > 0 and step % every == 0)


def finish(accelerator: Accelerator, code: int) -> int:
    accelerator.wait_for_everyone()  # without it, 2-process runs sometimes abort at exit
    accelerator.end_training()
    if torch.distributed.is_initialized():
        # Join the process group's threads now: left to interpreter shutdown, a gloo thread still alive
        # now and then ends a finished process with "terminate called without an active exception".
        torch.distributed.destroy_process_group()
    return code


def prepare_data(accelerator: Accelerator, cfg: config.Config, tokenizer):
    """The main process first (it fills the tokenization cache), then the others; a data error the main
    process finds ends every process with it, instead of leaving them waiting."""
    prepared, error = None, None
    if accelerator.is_main_process:
        try:
            prepared = data.prepare(cfg.data, tokenizer)
        except data.DataError as e:
            error = e
    if preemption.any_process(accelerator, error is not None):
        raise error or data.DataError("(reported by the main process)")
    return prepared or data.prepare(cfg.data, tokenizer)


def main(argv: list[str] | None = None) -> int:
    with contextlib.ExitStack() as held:  # what the run holds (its directory) is let go on every way out
        # 1. Config: everything is checked before any work starts, and nothing is written until it passes.
        log = metrics.setup_logging(is_main=os.environ.get("RANK", "0") == "0")
        cfg = config.from_argv(argv)
        t, out = cfg.training, Path(cfg.output.output_dir)
        preemption.follow_launcher()
        model_config, attn, warnings = models.preflight(cfg)
        shape = models.Shape.of(model_config)
        accelerator = make_accelerator(cfg)
        for warning in warnings:
            log.warning(warning)
        set_seed(t.seed)
        world = accelerator.num_processes

        # 2. Tokenizer and data: template, validation, tokenization (cached), the packing plan.
        tokenizer = models.load_tokenizer(cfg)
        added_tokens, end_token = templates.install(tokenizer, cfg.data.template)
        train_ds, eval_ds, report = prepare_data(accelerator, cfg, tokenizer)
        planner, evals = batches.planners(train_ds, eval_ds, cfg, tokenizer.pad_token_id,
                                          attention.layout(attn, cfg.data.packing), world, accelerator.process_index,
                                          shape.mask_windows())
        per_epoch = planner.steps_per_epoch
        total_steps = t.max_steps or per_epoch * t.num_epochs
        pack_eff = packing.efficiency(planner.rows, cfg.data.seq_len)
        log.info(f"data: {report.describe()}; {len(planner.rows)} rows of {cfg.data.seq_len} ({pack_eff:.1%} full), "
                 f"{len(evals.rows)} eval rows; {per_epoch} steps/epoch, {total_steps} steps")
        took_over = rundir.claim(held, out, accelerator)
        if accelerator.is_main_process:
            rundir.start_log_file(out, log)
            config.save(cfg, out / "config.yaml")
        if took_over:
            log.warning(took_over)

        # 3. Model and optimizer.
        attention.register()
        zero_stage = accelerator.state.deepspeed_plugin.zero_stage if accelerator.state.deepspeed_plugin else None
        model = models.load(cfg, attn, tokenizer, added_tokens, end_token, zero_stage, accelerator.device)
        flops = functools.partial(metrics.training_flops, models.matmul_parameters(model), shape,
                                  trainable_matmul_params=models.matmul_parameters(model, trainable=True))
        trainable, total = models.counts(model)
        log.info(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%})")
        optimizer = optim.make_optimizer(model, t)

        # 4. Prepare: DeepSpeed wraps model and optimizer (ZeRO-3 shards them across processes).
        model, optimizer = accelerator.prepare(model, optimizer)

        # 5. Resume: model, optimizer, RNG and loop state; the data position is a step number.
        ckpt_root = out / "checkpoints"
        state, notes = checkpoints.resume(accelerator, model, cfg, ckpt_root, report.fingerprint)
        for note in notes:
            log.warning(note) if "changed" in note or "broken" in note or "despite" in note else log.info(note)
        metrics.start_trackers(accelerator, cfg, state.step)
        shared, precision = metrics.setup(accelerator, cfg)
        summary = card.RunSummary(world_size=world, hardware=metrics.hardware(world), setup=shared, precision=precision,
                                  evals=state.evals)

        def eval_and_log() -> None:
            summary.eval_loss = loss.evaluate(model, accelerator, evals.shard(), evals.shard_batches)
            state.evals.append([state.step, summary.eval_loss])
            accelerator.log({"eval/loss": summary.eval_loss, "eval/perplexity": math.exp(min(summary.eval_loss, 50))},
                            step=state.step)
            log.info(f"step {state.step}: eval loss {summary.eval_loss:.4f}")

        if state.step == 0:
            accelerator.log(report.as_scalars() | {"data/packing_efficiency": pack_eff, "model/parameters": total,
                                                   "model/trainable_parameters": trainable}, step=0)
            if evals.rows:  # the starting point of the eval curve
                eval_and_log()

        # 6. The loop: one iteration is one optimizer step of `gradient_accumulation_steps` micro-batches.
        timers = metrics.Timers(accelerator.device)
        meter = metrics.Meter(world, metrics.peak_flops_per_device(t.peak_flops_per_device), flops, pack_eff, timers)
        stop_id = tokenizer.convert_tokens_to_ids(end_token)
        bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train")
        model.train()
        with (preemption.Preemption() as preempt,
              hub.checkpoint_uploads(cfg.output, accelerator.is_main_process) as uploads,
              batches.prefetch(planner, state.step, total_steps) as steps,
              profiling.profiled_steps(t.profile_from, t.profile_steps, state.step, total_steps, out / "profile",
                                       accelerator.process_index) as profiled):
            while state.step < total_steps:
                with timers("data", host=True):
                    step = next(steps)
                lr = optim.lr_at(state.step, total_steps, t)
                optim.set_lr(optimizer, lr)
                result = train_step(model, optimizer, accelerator, step, t.max_grad_norm, timers, preempt.requested)
                if result.nonfinite:
                    skip_or_stop(result.nonfinite, state, t.on_nonfinite, accelerator, ckpt_root)
                state.advance(step.tokens, step.rows, step.trained, result.loss is None, per_epoch)
                meter.add(step.tokens, step.trained, step.piece_lengths, result.loss, result.grad_norm)
                profiled(state.step)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss or float('nan'):.4f}", lr=f"{lr:.2e}")

                if due(state.step, t.log_every, total_steps):
                    summary.train_loss = metrics.log_window(accelerator, meter, lr, state, total_steps, per_epoch)
                if due(state.step, t.eval_every, total_steps) and evals.rows:
                    eval_and_log()
                if t.sample_prompts and due(state.step, t.sample_every, total_steps):
                    sampling.during_training(model, accelerator, tokenizer, t.sample_prompts, t.max_new_tokens, stop_id,
                                             state.step, out)
                if cfg.output.save and (due(state.step, t.save_every, total_steps) or result.preempted):
                    saved = checkpoints.save(accelerator, state, cfg, ckpt_root, model, tokenizer)
                    log.info(f"checkpoint {saved}")
                    if uploads:
                        uploads.submit(saved)
                if result.preempted:
                    return leave_preempted(accelerator, preempt, state.step, cfg.output.save, ckpt_root, out)
        bar.close()
        if summary.eval_loss is None and evals.rows:  # resumed at its last step: the card still gets one
            eval_and_log()

        # 7. Final model: safetensors + config + tokenizer (with chat template) + generation config; with
        # LoRA, the adapter (adapter/) and, unless lora.merge is off, the merged model (final/).
        if cfg.output.save:
            saved = export.save_final(accelerator, model, tokenizer, out, cfg)
            log.info("saved " + ", ".join(f"the {kind} to {folder}" for kind, folder in saved.items()))
            if accelerator.is_main_process:
                summary = dataclasses.replace(summary, steps=state.step, tokens_trained=state.tokens_trained,
                                              tokens_seen=state.tokens_seen, trainable=trainable, parameters=total,
                                              vocab=len(tokenizer) if added_tokens else 0)
                example = templates.render(tokenizer, [{"role": "user", "content": "How do I reverse a list?"}], True)
                served = templates.serving(tokenizer.chat_template)
                for kind, folder in saved.items():
                    card.model_card(cfg, summary, served, example, kind, folder).save(folder / "README.md")
                if cfg.output.push_to_hub:
                    for kind, folder in saved.items():
                        hub.upload(folder, hub.repo_for(cfg.output.hub_model_id, kind, saved),
                                   cfg.output.hub_private, message=f"{kind.capitalize()} after {state.step} steps")
        return finish(accelerator, 0)


def run(argv: list[str] | None = None) -> int:
    """main(), with what a user can fix said in one line, by the first process only, without a traceback:
    exit 2 for config and data, 1 for a run that cannot go on (a checkpoint, a non-finite step)."""
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        try:
            print(usage.text(), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        return main(argv)
    except (config.ConfigError, data.DataError, rundir.DirectoryInUse, templates.TemplateError) as e:
        return say(e, 2)
    except (checkpoints.CheckpointError, export.ExportError, FloatingPointError) as e:
        return say(e, 1)


def say(error: Exception, code: int) -> int:
    """The error, once: on the console and, once the run has one, in train.log (other processes stay quiet)."""
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger("loop").error(f"error: {error}")
    return code


if __name__ == "__main__":
    sys.exit(run())
