"""Run by tests/model/test_sequence_parallel.py under torch.distributed.run (2 processes, gloo): the cases the
first worker's short rows do not reach, for each model given. Dialogues longer than the models' 64-token sliding
window, so that the window cuts (Qwen2: on some layers, a mask per layer type); three rows a micro-batch, one of
them an empty filler, under gradient checkpointing (the recomputation exchanges heads again); a row whose second
half holds no target, through the plain logits (training.loss_chunk_tokens 0); and a mixture of experts' router
statistics from each process's `token_index`. For each: the largest difference between the whole rows on each
process and the split rows added up over the two processes, beside the largest value, written to OUT as JSON."""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from loop.data.batches import Columns, collate, split_sequence, to_device
from loop.model import attention, head, moe
from loop.model import sequence_parallel as sp
from loop.model.architecture import Shape


def run(folder: str, attn: str, batch, split: bool, checkpointing: bool, chunk: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32)
    head.install_chunked_head(model, chunk)
    recorder = moe.install(model, model.config, None)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = to_device(batch, "cpu")
    with recorder.recording() if recorder else nullcontext() as logits:
        loss = head.summed_cross_entropy(model, batch)
    out, balancing = [], 0.0
    if recorder:  # assignments, router probabilities (their gradient through a loss over them) and entropy
        counts, probs, entropy = moe.routing_sums(logits, batch["token_index"], recorder.router.top_k)
        balancing = (probs * torch.linspace(0, 1, len(probs))).sum()
        out = [counts.flatten(), probs.detach(), entropy]
    (loss + balancing).backward()
    out = [loss.detach().reshape(1), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]),
           *out]
    if split:
        for t in out:
            dist.all_reduce(t)
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    attention.register()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(60, 150, (7,), generator=g).tolist()
    ids = [torch.randint(5, 400, (n,), generator=g).tolist() for n in lengths]
    columns = Columns.from_lists(ids, [[j % 3 != 0 for j in range(len(x))] for x in ids])
    cases = {"rows": ([[(0, 0, lengths[0]), (1, 0, lengths[1])], [], [(i, 0, lengths[i]) for i in (4, 5, 6)]], True,
                      64),
             "tail": ([[(2, 0, 30)], [(3, 0, 7)]], False, 0)}
    report = {}
    for name, folder in json.loads(sys.argv[1]).items():
        windows = Shape.of(AutoConfig.from_pretrained(folder)).mask_windows()
        for attn in ("sdpa_varlen", "sdpa"):
            for case, (rows, checkpointing, chunk) in cases.items():
                sp.setup(2, rank, 1)
                batch = collate(columns, rows, 0, attention.layout(attn, "bfd"), mask_windows=windows)
                whole = run(folder, attn, batch, False, checkpointing, chunk)
                sp.setup(2, rank, 2)
                sp.install(attn)
                part = run(folder, attn, split_sequence(batch, 2, rank, 0), True, checkpointing, chunk)
                report[f"{name}/{attn}/{case}"] = [[(w - p).abs().max().item(), w.abs().max().item()]
                                                   for w, p in zip(whole, part)]
    if rank == 0:
        Path(sys.argv[2]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
