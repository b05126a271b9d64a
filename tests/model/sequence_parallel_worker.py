"""Run by tests/model/test_sequence_parallel.py under torch.distributed.run (2 processes, gloo): for each
model and layout, the summed loss and every gradient of packed rows whole on each process, then with the rows
split between the two processes (gradients and losses added over them), written to OUT as JSON."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from loop.data.batches import Columns, collate, split_sequence, to_device
from loop.data.pairs import pair_keys
from loop.model import attention, head
from loop.model import sequence_parallel as sp
from loop.training.sequences import sequence_log_probs


def gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def run(folder: str, attn: str, batch, split: bool) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32)
    head.install_chunked_head(model, 64)
    model.train()
    batch = to_device(batch, "cpu")
    loss = head.summed_cross_entropy(model, batch)
    loss.backward()
    sft = (loss.detach().clone(), gradients(model))
    model.zero_grad()
    logps = sequence_log_probs(model, batch)  # a pair's log-probabilities, over the whole row
    (logps * torch.linspace(-1, 1, len(logps))).sum().backward()  # a loss nonlinear in no single token
    out = [sft[0], sft[1], logps.detach(), gradients(model)]
    if split:
        for t in (out[0], out[1], out[3]):
            dist.all_reduce(t)
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    attention.register()
    report = {}
    models = json.loads(sys.argv[1])
    for name, folder in models.items():
        for attn in ("sdpa_varlen", "sdpa"):
            sp.setup(2, rank, 1)
            g = torch.Generator().manual_seed(1)
            lengths = torch.randint(3, 40, (9,), generator=g).tolist()
            ids = [torch.randint(5, 400, (n,), generator=g).tolist() for n in lengths]
            masks = [[j % 3 != 0 for j in range(len(x))] for x in ids]
            columns = Columns.from_lists(ids, masks)
            rows = [[(i, 0, len(ids[i])) for i in (0, 1, 2, 3)], [(i, 0, len(ids[i])) for i in (4, 5, 6, 7)]]
            batch = pair_keys()(collate(columns, rows, 0, attention.layout(attn, "bfd")), rows)
            whole = run(folder, attn, batch, split=False)
            sp.setup(2, rank, 2)
            sp.install(attn)
            part = run(folder, attn, split_sequence(batch, 2, rank, 0), split=True)
            report[f"{name}/{attn}"] = [[(w - p).abs().max().item(), w.abs().max().item()] for w, p in zip(whole, part)]
    if rank == 0:
        Path(sys.argv[2]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
