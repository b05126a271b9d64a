"""The multi-node path on one machine: two launches, machine ranks 0 and 1, over the loopback."""

import subprocess
import sys

from loop.state import checkpoints
from tests.conftest import ROOT, free_port, write_config


def test_two_machine_ranks_train_together_and_save_one_checkpoint(tiny_dir, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"max_steps": 4, "save_every": 4})
    port = str(free_port())

    def node(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "accelerate_configs" / "multinode_zero3.yaml"), "--num_machines", "2",
             "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, str(ROOT / "loop" / "train.py"), str(cfg)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [node(0), node(1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    found = checkpoints.complete_checkpoints(tmp_path / "out" / "checkpoints")
    assert [c.name for c in found] == ["step_00000004"]
    shards = sorted(f.name for f in (found[0] / "pytorch_model").glob("*optim_states.pt"))
    assert shards == [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
