"""loop: fine-tune code models into chat assistants with a hand-written Accelerate + DeepSpeed loop.

`loop/train.py` is the entry point and tells the story in order: config, data, model, prepare, resume, the
loop (step, bookkeeping, then the state handed to each component - logging, evaluation, samples,
checkpoints - which acts on its own schedule), the final model. Everything it calls lives in a
package named for its stage; a stage imports only the stages below it (each package's docstring lists them,
and tests/test_layout.py holds the tree to it, with no import circle anywhere):

    config      every setting and value list, YAML and --key value, --help      imports nothing of loop
    processes   how processes agree before acting together                      config
    data        records, formats, validation, templates, tokenizing, packing,   config
                batches; preference pairs and their packing
    engine      the accelerator and the engines behind one interface            config, processes
                (DeepSpeed ZeRO-3, accelerate's own path): step calls, save
                and load, checkpoint files and their safe reader, gathering
                weights, the memory model
    model       architectures, attention for packed rows, sequence parallelism, config, data, engine
                the loss head, LoRA, loading, FLOPs, the memory estimate
    training    what a step optimises (objectives: sft, dpo and its reference   config, processes, data,
                pass) and the optimizer step                                    engine, model
    state       the run's state on disk: progress, checkpoints, integrity,      config, processes, data,
                run directory, preemption, export, consolidation               engine, model
    report      log, metrics, trackers, profiling, model card, Hub              the above but training
    inference   loading a model to answer with, generation, chat               config, data, engine,
                                                                                model, state
    evaluation  does the model code: problems, answers, each program           config, processes, data,
                contained, pass@k; as a tool and at the checkpoints; the       engine, training, state,
                held-out loss at the loop's eval points                        inference, report
    launch      the front end a user or scheduler starts (tools/launch.py):     every stage above
                checks first, signals passed on, the run's own exit code

Where a change goes:
- a new objective: one module training/NAME.py with its `PLUGIN` (training/objective.py: its loss sum, what
  a step is normalised by, its statistics, the data it reads, its batch keys, what it does before training,
  dropout, its eval line and model-card section; dpo.py is the second) and NAME in config/settings.py's
  `Objective` (with a settings section named NAME if it has settings); the loop, the step, the evaluation,
  the card and the tools do not change, and nothing outside training/ asks for an objective by name.
- a new evaluation: a module that runs at the loop's eval point, beside evaluation/held_out.py (which sums
  with training/step.py's `held_out_sums`).
- a new set of coding problems (MBPP, say): a reader in evaluation/tasks.py; the question, the sandbox and
  pass@k stay as they are.
- a new data source or format: a reader in data/records.py or a converter in data/formats.py.
- a new engine (FSDP2): one module in engine/ registering an `Engine` (engine/interface.py: its step calls,
  save and load, checkpoint layout and reader, gathering, memory model) in engine/registry.py's ENGINES;
  nothing outside engine/ changes (no module outside it imports DeepSpeed or names its files).
- a tool: a thin front end in tools/ over these packages, with --help.
"""
