"""The engine under the loop, behind one interface: an `Engine` (interface.py) is a name and the functions the
rest of the loop calls: the step's engine calls, save and load, its checkpoints' file layout (which files each
process writes, who wrote a file, the safe streaming reader consolidation and export use), gathering the
weights, generation across processes, and the memory model. registry.py lists the engines by name
(deepspeed: DeepSpeed ZeRO, the default; fsdp2: PyTorch's FSDP2 through accelerate's FSDP plugin; accelerate:
accelerate's own path, one process or DDP) and holds
the one a run uses, chosen once where the accelerator is made (accelerator.py). Everything engine-specific
lives in this package: DeepSpeed's settings and calls (deepspeed.py) and ZeRO-3's checkpoint files
(zero3_files.py), FSDP2's calls (fsdp2.py) and its torch.distributed.checkpoint files (dcp_files.py), accelerate's
own (plain.py), the reader that never unpickles (safe_load.py). Outside it
nothing imports DeepSpeed or names its files (tests/test_layout.py).

May import: loop.config, loop.processes. A new engine is one module here filling in an
`Engine`, and its line in registry.ENGINES (as fsdp2.py was added).
"""
