"""Stage 4, training: what a step optimises (objective: the seam; sft: supervised fine-tuning, the first
objective; dpo: preference tuning on pairs, with its reference log-probabilities computed once before
training by reference) and the optimizer step itself (step: micro-batches, one all-reduce, the engine's
update; and the same objective on held-out rows), with AdamW and the learning-rate schedule (optim).

May import: loop.config, loop.processes, loop.data, loop.engine, loop.model. A new objective is one module here
(its loss sum, what a step is normalised by, its statistics) plus its settings in loop/config/settings.py.
"""
