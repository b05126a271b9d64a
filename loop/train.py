"""Fine-tune a StarCoder-family model on dialogues: Accelerate + DeepSpeed ZeRO-3, no Trainer.

    accelerate launch --config_file accelerate_configs/zero3.yaml loop/train.py configs/RUN.yaml [--key value]

The story, in order: config, data, model, prepare, resume, loop (step, bookkeeping, then the state handed
to each component: logging, evaluation, samples, checkpoints, code evaluation, each acting on its own
schedule), final model. Each side job lives in the package named for its stage (loop/__init__.py);
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
from loop.data import batches, templates
from loop.data.prepare import Prepared
from loop.engine.accelerator import end_run, exit_process, make_accelerator
from loop.evaluation import during_training, held_out
from loop.inference import sampling
from loop.model import architecture, attention, flops, load, moe, sequence_parallel
from loop.processes import fail_together
from loop.report import card, hub, logs, metrics, profiling, routing, timings, trackers
from loop.state import checkpoints, export, preemption, resuming, rundir
from loop.state.progress import LoopState
from loop.state.saver import Saver
from loop.training import optim, registry
from loop.training.objective import Plugin
from loop.training.step import train_step

# DeepSpeed calls torch.distributed APIs that torch marks deprecated, once per collective.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def skip_or_stop(what: str, state: LoopState, policy: str, accelerator: Accelerator, ckpt_root: Path) -> None:
    """A step that was not applied because something was not finite: stop the run, or count it."""
    if policy == "stop":
        raise config.NonFiniteStep(f"non-finite {what} at step {state.step + 1}; the step was not applied; "
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


def check_before_work(cfg: config.Config, objective: Plugin) -> tuple[object, str, list[str]]:
    """What a run refuses before any work starts, and before anything is written: (the model's config, the
    attention to use, warnings)."""
    out = Path(cfg.output.output_dir)
    preemption.follow_launcher()
    trackers.check(cfg.output.report_to)
    if cfg.output.push_to_hub and hub.offline():  # said now, not after the training it would upload
        raise config.ConfigError(f"output.push_to_hub: {hub.OFFLINE}")
    during_training.preflight(cfg.evaluation)
    checked = load.preflight(cfg, objective.dropout)
    rundir.check_writable(out)
    rundir.check_fresh(out, cfg.output.resume_from_checkpoint, cfg.output.overwrite_output_dir)
    return checked


def open_run(run_scope: contextlib.ExitStack, accelerator: Accelerator, cfg: config.Config, data: Prepared,
             log: logging.Logger) -> resuming.Resume:
    """Resume is checked (checkpoint, loop state, config, data) and the trackers started before anything is
    written; then the run directory is claimed, with its log file and resolved config."""
    out = Path(cfg.output.output_dir)
    resume = resuming.plan(accelerator, cfg, out / "checkpoints", data.report.fingerprint)
    claimed = rundir.claim(run_scope, out, accelerator, cfg.output.overwrite_output_dir)
    rundir.check_shared(out, accelerator)  # every node sees this folder: refused now, not at a checkpoint
    trackers.start(accelerator, cfg, resume.state.step)
    if accelerator.is_main_process:
        rundir.start_log_file(out, log)
        config.save(cfg, out / "config.yaml")
        for note in claimed:
            log.warning(note)
        for level, note in resume.notes:  # on the main process only: every process has the same to say
            log.log(level, note)
    return resume


def before_training(objective: Plugin, accelerator: Accelerator, model, cfg: config.Config, train,
                    evals: dict, added_tokens: list[int], attn: str) -> tuple:
    """The objective's work once the engine is prepared and before a checkpoint replaces the starting model
    (DPO: its reference log-probabilities of every pair, computed once, cached, read again on resume)."""
    planners = {"train": train} | {f"eval/{k}": v for k, v in evals.items()}
    planners = objective.before_training(accelerator, model, cfg, planners, added_tokens, attn)
    return planners.pop("train"), {k.removeprefix("eval/"): v for k, v in planners.items()}


def save_final(accelerator: Accelerator, model, tokenizer, cfg: config.Config, objective: Plugin,
               summary: card.RunSummary, state: LoopState, added_tokens: list[int]) -> None:
    """safetensors + config + tokenizer (with chat template) + generation config; with LoRA, the adapter
    (adapter/) and, unless lora.merge is off, the merged model (final/); each with its model card, and pushed
    to the Hub when asked."""
    saved = export.save_final(accelerator, model, tokenizer, Path(cfg.output.output_dir), cfg)
    logging.getLogger("loop").info("saved " + ", ".join(f"the {kind} to {folder}" for kind, folder in saved.items()))
    if not accelerator.is_main_process:
        return
    summary = dataclasses.replace(summary, steps=state.step, tokens_trained=state.tokens_trained,
                                  tokens_seen=state.tokens_seen, vocab=len(tokenizer) if added_tokens else 0,
                                  added_tokens=tuple(tokenizer.convert_ids_to_tokens(added_tokens)),
                                  marked=templates.marks_generation(tokenizer.chat_template))
    example = templates.render(tokenizer, [{"role": "user", "content": "How do I reverse a list?"}], True)
    served, section = templates.serving(tokenizer.chat_template), objective.card(cfg, summary.eval_results)
    for kind, folder in saved.items():
        card.model_card(cfg, summary, served, example, kind, folder, section).save(folder / "README.md")
    if cfg.output.push_to_hub:
        for kind, folder in saved.items():
            hub.upload(folder, hub.repo_for(cfg.output.hub_model_id, kind, saved), cfg.output.hub_private,
                       message=f"{kind.capitalize()} after {state.step} steps")


def log_plan(log: logging.Logger, data: Prepared, cfg: config.Config, train_planner, eval_planners: dict,
             total_steps: int) -> float:
    """The data line (what was read, the rows and how full they are, the steps) and each source's; returns how
    full the rows are."""
    pack_eff = data.train_rows.efficiency(cfg.data.seq_len)
    eval_rows = sum(len(p.rows) for p in eval_planners.values())
    log.info(f"data: {data.report.describe()}; {len(train_planner.rows)} rows of {cfg.data.seq_len} ({pack_eff:.1%} "
             f"full), {eval_rows} eval rows; {train_planner.steps_per_epoch} steps/epoch, {total_steps} steps")
    for line in data.report.describe_sources():
        log.info(line)
    return pack_eff


def main(argv: list[str] | None = None) -> int:
    with contextlib.ExitStack() as run_scope:  # what the run holds (its directory) is let go on every way out
        # 1. Config: everything is checked before any work starts, and nothing is written until it passes.
        phases = timings.Phases()  # where the time went, said at the end
        log = logs.setup_logging(is_main=os.environ.get("RANK", "0") == "0")
        cfg = config.from_argv(argv)
        t, out, objective = cfg.training, Path(cfg.output.output_dir), registry.pick(cfg)
        model_config, attn, notes = check_before_work(cfg, objective)
        shape = architecture.Shape.of(model_config)
        accelerator = make_accelerator(cfg)
        load.check_memory(model_config, cfg, accelerator)
        for note in notes:
            log.warning(note)
        set_seed(t.seed)
        world = accelerator.num_processes
        split = sequence_parallel.setup(world, accelerator.process_index, cfg.parallelism.sequence_parallel_size)

        # 2. Tokenizer and data: template, validation, tokenization (cached), the packing plan; then the run
        # directory, once resume is checked against the data.
        tokenizer = load.load_tokenizer(cfg)
        added_tokens, end_token = templates.install(tokenizer, cfg.data.template)
        data = objective.prepare_run(accelerator, cfg, tokenizer)
        # Resumed on another number of processes, this sets the accumulation steps that keep the global batch.
        resume = open_run(run_scope, accelerator, cfg, data, log)
        state, ckpt_root = resume.state, out / "checkpoints"
        train_planner, eval_planners = batches.planners(data, cfg, tokenizer.pad_token_id,
                                                        attention.layout(attn, cfg.data.packing),
                                                        split.data_size, split.data_rank, shape.mask_windows(),
                                                        extra=objective.batch_keys, sequence=(split.size, split.rank))
        per_epoch = train_planner.steps_per_epoch
        total_steps = t.max_steps or math.ceil(per_epoch * t.num_epochs)
        pack_eff = log_plan(log, data, cfg, train_planner, eval_planners, total_steps)
        phases.done("data")

        # 3. Model and optimizer.
        attention.register()
        sequence_parallel.install(attn)  # with sequence parallelism: attention over the whole row, heads exchanged
        model = load.load_model(cfg, attn, tokenizer, added_tokens, end_token, accelerator, objective.dropout)
        router = moe.install(model, model_config, cfg.model.router_aux_loss_coef)  # a mixture of experts' router
        step_flops = flops.counter(model, shape)
        trainable, total = flops.counts(model)
        log.info(f"model: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%})")
        optimizer = optim.make_optimizer(model, t)

        # 4. Prepare: DeepSpeed wraps model and optimizer (ZeRO-3 shards them across processes); then what the
        # objective does before training.
        model, optimizer = accelerator.prepare(model, optimizer)
        train_planner, eval_planners = before_training(objective, accelerator, model, cfg, train_planner,
                                                       eval_planners, added_tokens, attn)
        phases.done("model and engine start")

        # 5. Resume: model, optimizer and RNG states; the data position is the loop state's step number. Then
        # the components, each acting on its own schedule, and the starting point of the curves.
        resuming.restore(accelerator, model, resume, partial=cfg.lora.enabled)
        setup, precision = card.run_setup(accelerator, cfg)
        summary = card.RunSummary(world_size=world, hardware=card.hardware(world), setup=setup, precision=precision,
                                  eval_losses=state.eval_losses, trainable=trainable, parameters=total)
        loss = objective.loss(cfg)
        evaluator = held_out.Evaluator(model, accelerator, objective, loss, eval_planners, t.eval_every, total_steps,
                                       summary)
        code_eval = during_training.CodeEval(cfg, accelerator, tokenizer, end_token, summary, state.step, total_steps)
        timers = metrics.Timers(accelerator.device)
        meter = metrics.Meter(world, metrics.peak_flops_per_device(t.peak_flops_per_device), step_flops, pack_eff,
                              timers)
        experts = routing.RoutingWindow(cfg.model.expert_collapse_fraction)  # a mixture of experts' routing
        logger = metrics.Logger(accelerator, meter, t.log_every, total_steps, per_epoch, summary, objective.console,
                                experts)
        sampler = sampling.Sampler(model, accelerator, tokenizer, t, tokenizer.convert_tokens_to_ids(end_token),
                                   total_steps, out)
        if state.step == 0:
            accelerator.log(data.report.as_scalars() | {"data/packing_efficiency": pack_eff, "model/parameters": total,
                                                        "model/trainable_parameters": trainable}, step=0)
            evaluator.maybe_evaluate(state)
            code_eval(model, 0, None)

        # 6. The loop: one iteration is one optimizer step of `gradient_accumulation_steps` micro-batches, its
        # bookkeeping, then the state handed to each component, which acts when its schedule says.
        bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train")
        model.train()
        with (preemption.Preemption() as preempt,
              hub.checkpoint_uploads(cfg.output, accelerator.is_main_process) as uploads,
              batches.prefetch(train_planner, state.step, total_steps) as steps,
              profiling.profiled_steps(t.profile_from, t.profile_steps, state.step, total_steps, out / "profile",
                                       accelerator.process_index) as profiled):
            saver = Saver(accelerator, cfg, ckpt_root, model, tokenizer, resume.run, uploads, total_steps)
            while state.step < total_steps:
                with timers("data", host=True):
                    step = next(steps)
                lr = optim.lr_at(state.step, total_steps, t)
                optim.set_lr(optimizer, lr)
                result = train_step(model, optimizer, accelerator, step, loss, t.max_grad_norm, timers,
                                    preempt.requested, router)
                if result.nonfinite:
                    skip_or_stop(result.nonfinite, state, t.on_nonfinite, accelerator, ckpt_root)
                state.advance(step.tokens, step.rows, step.trained, result.loss is None, per_epoch)
                meter.add(step.tokens, step.trained, step.piece_lengths, result.loss, result.grad_norm,
                          result.statistics)
                experts.add(result.routing)
                profiled(state.step)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss or float('nan'):.4f}", lr=f"{lr:.2e}")

                logger.maybe_log(state, lr)
                evaluator.maybe_evaluate(state)
                sampler.maybe_sample(state)
                saved = saver.maybe_save(state, now=result.preempted)
                if result.preempted:
                    return leave_preempted(accelerator, preempt, state.step, cfg.output.save, ckpt_root, out)
                code_eval(model, state.step, saved)
        bar.close()
        phases.done("training")
        evaluator.ensure_final(state)

        # 7. Final model, its model card, and the Hub.
        if cfg.output.save:
            save_final(accelerator, model, tokenizer, cfg, objective, summary, state, added_tokens)
            phases.done("final model")
        if accelerator.is_main_process:
            log.info(timings.describe(timings.record(out, phases.spent, fresh=True)))
        return end_run(accelerator, 0)


def run(argv: list[str] | None = None) -> int:
    """main(), with what a user can fix said in one line, by the first process only, without a traceback, and
    the error's exit code (loop/config/errors.py: 2 for config and data, 1 for a run that cannot go on)."""
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        try:
            print(usage.text(), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        return main(argv)
    except config.UserError as e:
        return report_error(e, e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the loop (setup, final save): no step to finish, nothing half-kept
        return report_error(KeyboardInterrupt("interrupted (Ctrl-C) outside the training loop; checkpoints "
                                              "already written are intact"), preemption.INTERRUPTED_EXIT_CODE)


def report_error(error: BaseException, code: int) -> int:
    """The error, once: on the console and, once the run has one, in train.log, said by the first process
    before any process of a launch exits, and named in torchrun's failure summary (loop/processes.py)."""
    line = f"error: {error}"
    fail_together(lambda: logging.getLogger("loop").error(line), line)
    return code


if __name__ == "__main__":
    exit_process(run())  # os._exit after flushing: see loop/engine/accelerator.py
