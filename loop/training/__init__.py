"""Stage 4, training: what a step optimises (objective: the seams; sft: supervised fine-tuning, the first
objective; dpo: preference tuning on pairs, with its reference log-probabilities computed once before
training by reference; registry: the one place that picks an objective by its name) and the optimizer step
itself (step: micro-batches, one all-reduce, the engine's update; and the same objective on held-out rows),
with AdamW and the learning-rate schedule (optim).

May import: loop.config, loop.processes, loop.data, loop.engine, loop.model.

A new objective is one module here, NAME.py, whose `PLUGIN` declares everything the run needs from it (its
loss, its data, its batch keys, its hook before training, its model settings, its eval line and model-card
section), plus NAME in config's `Objective` list (and its settings section, if any). Only this package asks
which objective runs (tests/test_layout.py checks it).
"""
