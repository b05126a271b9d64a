"""Stage 3, the model: what the loop must know about an architecture (architecture), the attention that
keeps packed dialogues apart (attention), the loss computed inside the output projection (head), loading
a model ready to train (load), LoRA and QLoRA through peft (lora), FLOPs (flops), the memory estimate
(estimate) and the embedded default's tiny models (tiny).

May import: loop.config, loop.data, loop.engine.
"""
