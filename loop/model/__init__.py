"""Stage 3, the model: what the loop must know about an architecture (architecture), the attention that
keeps packed dialogues apart (attention), the loss computed inside the output projection (head), loading
a model ready to train (load), LoRA and QLoRA through peft (lora), FLOPs (flops) and the memory estimate
(estimate). The tiny models of the quickstart and the tests are built by tools/builders/tiny.py.

May import: loop.config, loop.data, loop.engine.
"""
