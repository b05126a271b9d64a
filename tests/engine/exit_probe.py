"""A short 2-process ZeRO-3 run that ends as loop/train.py ends (end_run, then exit_process): the stress test
in tests/engine/test_accelerator.py launches it many times and counts aborts at exit."""

import os
import sys

import torch

from loop.config import Config
from loop.engine.accelerator import end_run, exit_process, make_accelerator


def main() -> int:
    cfg = Config()
    cfg.output.output_dir, cfg.output.report_to = sys.argv[1], []
    cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps = 1, 1
    accelerator = make_accelerator(cfg)
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss = model(torch.randn(2, 64, dtype=next(model.parameters()).dtype)).float().pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()
    return end_run(accelerator, 0)


if __name__ == "__main__":
    code = main()
    print(f"closed on rank {os.environ.get('RANK')}", end="")  # left in the buffer: exit_process must flush it
    if "--plain-exit" in sys.argv:  # the exit before exit_process, for comparison
        sys.exit(code)
    exit_process(code)
