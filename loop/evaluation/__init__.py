"""Stage 8, does the model code: problems (HumanEval, or a user's own in its keys) asked through the chat
template, the code taken from each answer and run against the problem's tests, each program contained,
scored as pass@k; as a tool (tools/evaluate.py) and at the loop's checkpoints.

tasks (problems, the question asked, the code taken from an answer) -> generation (answers, batched) ->
sandbox (one program contained; child.py is what runs inside it) -> scoring (verdicts, pass@k, the files) ->
during_training (split across processes, gathered, logged, saved next to the checkpoint). Beside it, held_out:
the objective's loss over the held-out rows, at the loop's eval points.

May import: loop.config, loop.processes, loop.data, loop.engine, loop.training, loop.state, loop.inference,
loop.report.
"""
