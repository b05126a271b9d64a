"""The engine under the loop, in one place: today DeepSpeed (ZeRO-3), or accelerate's own path (one process,
DDP). Everything DeepSpeed-specific lives in this package: the accelerator and DeepSpeed's settings
(accelerator, deepspeed), the engine calls of the optimizer step (step: the one place that branches on the
engine), and ZeRO-3's checkpoint files with the safe reader for them (zero3_files).

May import: loop.config, loop.processes. A second engine (FSDP, say) would be a sibling module of
deepspeed.py and zero3_files.py, with its branch in step.py.
"""
