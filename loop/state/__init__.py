"""Stage 5, the run's state on disk: the loop's counters (progress), checkpoints that a crash cannot corrupt
and resume that trusts nothing it reads: every file's digest, the safe reader, the loop state (checkpoints,
integrity), the output directory one run holds
(rundir), preemption signals that become a checkpoint (preemption), and turning the live model or a
checkpoint into a checked model folder (export, consolidate).

May import: loop.config, loop.processes, loop.data, loop.engine, loop.model.
"""
