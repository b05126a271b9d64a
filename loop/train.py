"""Fine-tune a StarCoder-family model on dialogues: Accelerate + DeepSpeed ZeRO-3, no Trainer.

    accelerate launch --config_file accelerate_configs/zero3.yaml loop/train.py configs/RUN.yaml [--key value]

The story, in order: config, data, model, prepare, resume, loop (step, bookkeeping, then log, eval,
sample, save), final model. Each side job lives in the package named for its stage (loop/__init__.py);
this file tells the order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import warnings
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from loop import config
from loop.config import usage
from loop.data import batches, pairs, preference, templates
from loop.data.prepare import Prepared, open_prepared, prepare
from loop.data.records import DataError
from loop.engine import deepspeed
from loop.engine.accelerator import end_run, exit_process, make_accelerator
from loop.evaluation import during_training
from loop.inference import sampling
from loop.model import architecture, attention, flops, load
from loop.processes import main_decides
from loop.report import card, hub, logs, metrics, profiling, trackers
from loop.state import checkpoints, export, preemption, rundir
from loop.state.progress import LoopState
from loop.training import dpo, optim, reference
from loop.training.sft import SFT
from loop.training.step import evaluate_sources, train_step

# DeepSpeed calls torch.distributed APIs that torch marks deprecated, once per collective.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def skip_or_stop(what: str, state: LoopState, policy: str, accelerator: Accelerator, ckpt_root: Path) -> None:
    """A step that was not applied because something was not finite: stop the run, or count it."""
    if policy == "stop":
        raise FloatingPointError(f"non-finite {what} at step {state.step + 1}; the step was not applied; "
                                 f"last good checkpoint: {checkpoints.last_good(ckpt_root)}")
    logging.getLogger("loop").warning(f"step {state.step + 1}: non-finite {what}, optimizer step skipped "
                                      f"({state.skipped_steps + 1} so far)")
    accelerator.log({"train/skipped_steps": state.skipped_steps + 1}, step=state.step + 1)


def leave_preempted(accelerator: Accelerator, preempt: preemption.Preemption, step: int, saving: bool, ckpt_root: Path,
                    out: Path) -> int:
    """Say what was saved and how to resume, mark the run directory, and exit with the requeue code (75), or
    130 for a Ctrl-C."""
    saved = checkpoints.last_good(ckpt_root) if saving else "nothing (output.save: false)"
    how = "interrupted" if preempt.exit_code == preemption.INTERRUPTED_EXIT_CODE else "preempted"
    if accelerator.is_main_process:
        logging.getLogger("loop").warning(f"{how} ({preempt.describe()}) at step {step}; saved {saved}; "
                                          "resume with --resume_from_checkpoint latest")
        (out / rundir.PREEMPTED).write_text(f"step {step}\nexit {preempt.exit_code}\n")
    return end_run(accelerator, preempt.exit_code)


def on_schedule(step: int, every: int, last: int) -> bool:
    """Every `every` steps (0: never) and at the last step."""
    return step == last or (every > 0 and step % every == 0)


def prepare_data(accelerator: Accelerator, cfg: config.Config, tokenizer) -> Prepared:
    """The main process prepares the data (or finds it in the cache) and every process memory-maps the same
    folder; a data error the main process finds ends every process with it, instead of leaving them waiting.
    A process that cannot see the main's cache folder (node-local disks) prepares its own copy. Preference
    pairs are records of their own (loop/data/preference.py): the main process first, then the others."""
    if cfg.training.objective == "dpo":
        made: list[Prepared] = []
        main_decides(accelerator, lambda: made.append(preference.prepare(cfg.data, cfg.dpo, tokenizer)), (DataError,))
        return made[0] if made else preference.prepare(cfg.data, cfg.dpo, tokenizer)
    folder = Path(main_decides(accelerator, lambda: str(prepare(cfg.data, tokenizer)), (DataError,)))
    if not (folder / "meta.json").is_file():
        folder = prepare(cfg.data, tokenizer, progress=False)
    return open_prepared(folder, cfg.data, cfg.training.seed)


def main(argv: list[str] | None = None) -> int:
    with contextlib.ExitStack() as run_scope:  # what the run holds (its directory) is let go on every way out
        # 1. Config: everything is checked before any work starts, and nothing is written until it passes.
        log = logs.setup_logging(is_main=os.environ.get("RANK", "0") == "0")
        cfg = config.from_argv(argv)
        t, out = cfg.training, Path(cfg.output.output_dir)
        preemption.follow_launcher()
        trackers.check(cfg.output.report_to)
        if cfg.output.push_to_hub and hub.offline():  # said now, not after the training it would upload
            raise config.ConfigError(f"output.push_to_hub: {hub.OFFLINE}")
        during_training.preflight(cfg.evaluation)
        model_config, attn, notes = load.preflight(cfg)
        rundir.check_writable(out)
        rundir.check_fresh(out, cfg.output.resume_from_checkpoint, cfg.output.overwrite_output_dir)
        shape = architecture.Shape.of(model_config)
        accelerator = make_accelerator(cfg)
        load.check_memory(model_config, cfg, accelerator)
        for note in notes:
            log.warning(note)
        set_seed(t.seed)
        world = accelerator.num_processes
        preferring = t.objective == "dpo"
        objective = dpo.objective(cfg.dpo) if preferring else SFT

        # 2. Tokenizer and data: template, validation, tokenization (cached), the packing plan.
        tokenizer = load.load_tokenizer(cfg)
        added_tokens, end_token = templates.install(tokenizer, cfg.data.template)
        data = prepare_data(accelerator, cfg, tokenizer)
        train_planner, eval_planners = batches.planners(data, cfg, tokenizer.pad_token_id,
                                                        attention.layout(attn, cfg.data.packing), world,
                                                        accelerator.process_index, shape.mask_windows(),
                                                        extra=pairs.pair_keys() if preferring else None)
        per_epoch = train_planner.steps_per_epoch
        total_steps = t.max_steps or math.ceil(per_epoch * t.num_epochs)
        pack_eff = data.train_rows.efficiency(cfg.data.seq_len)
        eval_rows = sum(len(p.rows) for p in eval_planners.values())
        log.info(f"data: {data.report.describe()}; {len(train_planner.rows)} rows of {cfg.data.seq_len} "
                 f"({pack_eff:.1%} full), {eval_rows} eval rows; {per_epoch} steps/epoch, {total_steps} steps")
        for line in data.report.describe_sources():
            log.info(line)
        # Resume is checked (checkpoint, loop state, config) and the trackers started before anything is written.
        ckpt_root = out / "checkpoints"
        resume = checkpoints.plan_resume(accelerator, cfg, ckpt_root, data.report.fingerprint)
        claimed = rundir.claim(run_scope, out, accelerator, cfg.output.overwrite_output_dir)
        trackers.start(accelerator, cfg, resume.state.step)
        if accelerator.is_main_process:
            rundir.start_log_file(out, log)
            config.save(cfg, out / "config.yaml")
            for note in claimed:
                log.warning(note)
            for level, note in resume.notes:  # on the main process only: every process has the same to say
                log.log(level, note)
        state = resume.state

        # 3. Model and optimizer.
        attention.register()
        model = load.load_model(cfg, attn, tokenizer, added_tokens, end_token, deepspeed.zero_stage(accelerator),
                                accelerator.device)
        step_flops = flops.counter(model, shape)
        trainable, total = flops.counts(model)
        log.info(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%})")
        optimizer = optim.make_optimizer(model, t)

        # 4. Prepare: DeepSpeed wraps model and optimizer (ZeRO-3 shards them across processes).
        model, optimizer = accelerator.prepare(model, optimizer)

        # 4b. Preference tuning: the starting model's log-probabilities of every pair, before a checkpoint
        # replaces it (computed once, cached, read again on resume).
        if preferring and cfg.dpo.reference == "precomputed":
            planners = {"train": train_planner} | {f"eval/{k}": v for k, v in eval_planners.items()}
            key = reference.cache_key(cfg, planners, added_tokens, str(accelerator.mixed_precision), attn, world)
            planners = reference.attach(accelerator, model, cfg, planners, key,
                                        Path(cfg.data.cache_dir or out / "reference"))
            train_planner = planners.pop("train")
            eval_planners = {k.removeprefix("eval/"): v for k, v in planners.items()}

        # 5. Resume: model, optimizer and RNG states; the data position is the loop state's step number.
        checkpoints.restore(accelerator, model, resume, partial=cfg.lora.enabled)
        setup, precision = card.run_setup(accelerator, cfg)
        summary = card.RunSummary(world_size=world, hardware=card.hardware(world), setup=setup, precision=precision,
                                  eval_losses=state.eval_losses)
        code_eval = during_training.CodeEval(cfg, accelerator, tokenizer, end_token, summary, state.step, total_steps)

        def eval_and_log() -> None:
            result = evaluate_sources(model, accelerator, objective, eval_planners)
            summary.eval_loss = result["eval/loss"]
            summary.eval_reward_accuracy = result.get("eval/rewards/accuracies")
            state.eval_losses.append([state.step, summary.eval_loss])
            perplexity = {} if preferring else {"eval/perplexity": math.exp(min(summary.eval_loss, 50))}
            accelerator.log(result | perplexity, step=state.step)
            by_source = ", ".join(f"{k.removeprefix('eval/loss/')} {v:.4f}" for k, v in result.items()
                                  if k.startswith("eval/loss/"))
            accuracy = f", reward accuracy {summary.eval_reward_accuracy:.1%}" if preferring else ""
            log.info(f"step {state.step}: eval loss {summary.eval_loss:.4f}{accuracy}"
                     + (f" ({by_source})" if by_source else ""))

        if state.step == 0:
            accelerator.log(data.report.as_scalars() | {"data/packing_efficiency": pack_eff, "model/parameters": total,
                                                        "model/trainable_parameters": trainable}, step=0)
            if eval_rows:  # the starting point of the eval curve
                eval_and_log()
            code_eval(model, 0, None)

        # 6. The loop: one iteration is one optimizer step of `gradient_accumulation_steps` micro-batches.
        timers = metrics.Timers(accelerator.device)
        meter = metrics.Meter(world, metrics.peak_flops_per_device(t.peak_flops_per_device), step_flops, pack_eff,
                              timers)
        stop_id = tokenizer.convert_tokens_to_ids(end_token)
        bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train")
        model.train()
        with (preemption.Preemption() as preempt,
              hub.checkpoint_uploads(cfg.output, accelerator.is_main_process) as uploads,
              batches.prefetch(train_planner, state.step, total_steps) as steps,
              profiling.profiled_steps(t.profile_from, t.profile_steps, state.step, total_steps, out / "profile",
                                       accelerator.process_index) as profiled):
            while state.step < total_steps:
                with timers("data", host=True):
                    step = next(steps)
                lr = optim.lr_at(state.step, total_steps, t)
                optim.set_lr(optimizer, lr)
                result = train_step(model, optimizer, accelerator, step, objective, t.max_grad_norm, timers,
                                    preempt.requested)
                if result.nonfinite:
                    skip_or_stop(result.nonfinite, state, t.on_nonfinite, accelerator, ckpt_root)
                state.advance(step.tokens, step.rows, step.trained, result.loss is None, per_epoch)
                meter.add(step.tokens, step.trained, step.piece_lengths, result.loss, result.grad_norm,
                          result.statistics)
                profiled(state.step)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss or float('nan'):.4f}", lr=f"{lr:.2e}")

                if on_schedule(state.step, t.log_every, total_steps):
                    summary.train_loss = metrics.log_window(accelerator, meter, lr, state, total_steps, per_epoch)
                if on_schedule(state.step, t.eval_every, total_steps) and eval_rows:
                    eval_and_log()
                if t.sample_prompts and on_schedule(state.step, t.sample_every, total_steps):
                    sampling.during_training(model, accelerator, tokenizer, t.sample_prompts, t.max_new_tokens,
                                             stop_id, state.step, out)
                saved = None
                if cfg.output.save and (on_schedule(state.step, t.save_every, total_steps) or result.preempted):
                    saved = checkpoints.save(accelerator, state, cfg, ckpt_root, model, tokenizer, resume.run)
                    log.info(f"checkpoint {saved}")
                    if uploads:
                        uploads.submit(saved)
                if result.preempted:
                    return leave_preempted(accelerator, preempt, state.step, cfg.output.save, ckpt_root, out)
                code_eval(model, state.step, saved)
        bar.close()
        if summary.eval_loss is None and eval_rows:  # resumed at its last step: the card still gets one
            eval_and_log()

        # 7. Final model: safetensors + config + tokenizer (with chat template) + generation config; with
        # LoRA, the adapter (adapter/) and, unless lora.merge is off, the merged model (final/).
        if cfg.output.save:
            saved = export.save_final(accelerator, model, tokenizer, out, cfg)
            log.info("saved " + ", ".join(f"the {kind} to {folder}" for kind, folder in saved.items()))
            if accelerator.is_main_process:
                summary = dataclasses.replace(summary, steps=state.step, tokens_trained=state.tokens_trained,
                                              tokens_seen=state.tokens_seen, trainable=trainable, parameters=total,
                                              vocab=len(tokenizer) if added_tokens else 0,
                                              added_tokens=tuple(tokenizer.convert_ids_to_tokens(added_tokens)),
                                              marked=templates.marks_generation(tokenizer.chat_template))
                example = templates.render(tokenizer, [{"role": "user", "content": "How do I reverse a list?"}], True)
                served = templates.serving(tokenizer.chat_template)
                for kind, folder in saved.items():
                    card.model_card(cfg, summary, served, example, kind, folder).save(folder / "README.md")
                if cfg.output.push_to_hub:
                    for kind, folder in saved.items():
                        hub.upload(folder, hub.repo_for(cfg.output.hub_model_id, kind, saved),
                                   cfg.output.hub_private, message=f"{kind.capitalize()} after {state.step} steps")
        return end_run(accelerator, 0)


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
    except (config.ConfigError, DataError, rundir.DirectoryInUse, templates.TemplateError, trackers.TrackerError) as e:
        return report_error(e, 2)
    except (checkpoints.CheckpointError, export.ExportError, FloatingPointError) as e:
        return report_error(e, 1)
    except KeyboardInterrupt:  # Ctrl-C outside the loop (setup, final save): no step to finish, nothing half-kept
        return report_error(KeyboardInterrupt("interrupted (Ctrl-C) outside the training loop; checkpoints "
                                              "already written are intact"), preemption.INTERRUPTED_EXIT_CODE)


def report_error(error: Exception, code: int) -> int:
    """The error, once: on the console and, once the run has one, in train.log (other processes stay quiet)."""
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger("loop").error(f"error: {error}")
    return code


if __name__ == "__main__":
    exit_process(run())  # os._exit after flushing: see loop/engine/accelerator.py
