"""Stage 2, data: from the files users have to the tensors of a step.

records (reading files, what can be wrong with a record) -> formats and oasst (converters to the messages
schema) -> dialogues (validation, split, the data report; tool calls, results and tool lists in calls) ->
templates (the Jinja chat template, the one source of trained tokens) -> tokenize (cached) -> prepare (all of
it for a run; workers, what its worker processes run, imports no torch) -> packing (rows and their order) ->
batches (collate, the per-step plan, the prefetch thread).
Preference tuning reads its own records: preference (the three pair shapes, validation, truncation,
tokenizing) -> pairs (whole pairs packed into rows, and the keys a pair's batch carries). The shipped tool-use
set in tool_use/ is built by tools/builders/toolset.py (tools/make_tool_data.py).

May import: loop.config. Nothing here knows about models, engines or checkpoints.
"""
