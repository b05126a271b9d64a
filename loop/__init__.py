"""loop: fine-tune code models into chat assistants with a hand-written Accelerate + DeepSpeed loop.

`loop/train.py` is the entry point and tells the story in order: config, data, model, prepare, resume, the
loop (step, bookkeeping, then log / eval / sample / save), the final model. Everything it calls lives in a
package named for its stage; a stage imports only the stages below it (each package's docstring lists them,
and tests/test_layout.py holds the tree to it, with no import circle anywhere):

    config      every setting and value list, YAML and --key value, --help      imports nothing of loop
    processes   how processes agree before acting together                      config
    data        records, formats, validation, templates, tokenizing, packing,   config
                batches; preference pairs and their packing
    engine      the accelerator and everything DeepSpeed: settings, the step's  config, processes
                engine calls, ZeRO-3 checkpoint files and their safe reader
    model       architectures, attention for packed rows, the loss head, LoRA,  config, data, engine
                loading, FLOPs, the memory estimate, the tiny default models
    training    what a step optimises (objectives: sft, dpo and its reference   config, processes, data,
                pass) and the optimizer step                                    engine, model
    state       the run's state on disk: progress, checkpoints, integrity,      config, processes, data,
                run directory, preemption, export, consolidation               engine, model
    report      log, metrics, trackers, profiling, model card, Hub              the above but training
    inference   loading a model to answer with, generation, chat               config, data, engine,
                                                                                model, state
    evaluation  does the model code: problems, answers, each program           config, processes, data,
                contained, pass@k; as a tool and at the checkpoints            engine, inference, report
    launch      the front end a user or scheduler starts (tools/launch.py):     every stage above
                checks first, signals passed on, the run's own exit code

Where a change goes:
- a new objective: one module in training/ (its loss sum, what a step is normalised by, its statistics; see
  training/objective.py, and dpo.py for the second) and its settings in config/settings.py; the step does
  not change.
- a new evaluation: a module that runs at the loop's eval point, beside training/step.py's `evaluate`.
- a new set of coding problems (MBPP, say): a reader in evaluation/tasks.py; the question, the sandbox and
  pass@k stay as they are.
- a new data source or format: a reader in data/records.py or a converter in data/formats.py.
- a new engine (FSDP): a sibling of engine/deepspeed.py and engine/zero3_files.py, with its branch in
  engine/step.py.
- a tool: a thin front end in tools/ over these packages, with --help.
"""
