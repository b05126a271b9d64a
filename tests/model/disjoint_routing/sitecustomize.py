"""Loaded by every Python process of a run launched with this folder first on PYTHONPATH (tests/model/
test_families.py): each process's routers may only choose its own half of the experts (rank 0 the first
half, rank 1 the second), so the two ranks' tokens go to disjoint experts, as happens by chance in a real run.
The experts each rank chose are written to ROUTING_RECORD/rank{N}.json, for the test to check."""

import json
import os
from pathlib import Path

if os.environ.get("ROUTING_RECORD") and "RANK" in os.environ:
    import torch
    import torch.nn.functional as F
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.qwen2_moe import modeling_qwen2_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    RECORD = Path(os.environ["ROUTING_RECORD"]) / f"rank{RANK}.json"
    chosen: set[int] = set()

    def forward(self, hidden_states):
        """The routers' own computation, with the other ranks' experts masked out."""
        hidden = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden, self.weight)
        owner = torch.arange(self.num_experts, device=logits.device) * WORLD // self.num_experts
        logits = logits.masked_fill(owner != RANK, -1e4)
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        new = set(index.unique().tolist()) - chosen
        if new:
            chosen.update(new)
            RECORD.write_text(json.dumps(sorted(chosen)))
        return logits, top.to(logits.dtype), index

    for module in (modeling_qwen3_moe.Qwen3MoeTopKRouter, modeling_qwen2_moe.Qwen2MoeTopKRouter,
                   modeling_mixtral.MixtralTopKRouter):
        module.forward = forward
