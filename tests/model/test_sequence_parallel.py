import json
import subprocess
import sys

import pytest
import torch

from loop.config import ConfigError
from loop.model import sequence_parallel
from tests.conftest import ROOT, free_port


def on_two_processes(worker: str, family_dirs, families: tuple[str, ...], tmp_path) -> dict:
    """A worker of tests/model/ run under torch.distributed.run on 2 processes (gloo) with the families' tiny
    models: the report it writes."""
    models = {f: str(family_dirs(f) / "model") for f in families}
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "model" / worker), json.dumps(models), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_processes_are_grouped_by_consecutive_ranks():
    assert [sequence_parallel.plan(4, r, 2) for r in range(4)] == [
        sequence_parallel.Split(2, 0, 2, 0), sequence_parallel.Split(2, 1, 2, 0),
        sequence_parallel.Split(2, 0, 2, 1), sequence_parallel.Split(2, 1, 2, 1)]
    with pytest.raises(ConfigError, match="^parallelism.sequence_parallel_size: 2 does not divide the run's 3 "
                                          "processes$"):
        sequence_parallel.plan(3, 0, 2)


def test_heads_that_cannot_be_shared_out_are_named():
    assert sequence_parallel.check_heads(8, 1, 4) is None  # multi-query: the key/value head is copied
    assert sequence_parallel.check_heads(8, 2, 2) is None
    assert sequence_parallel.check_heads(6, 6, 4) == \
        "the model's 6 attention heads do not divide by sequence_parallel_size 4"
    assert sequence_parallel.check_heads(12, 3, 4) == \
        "the model's 3 key/value heads and sequence_parallel_size 4: neither divides the other"


def test_processes_sharing_a_row_draw_their_own_dropout_masks(monkeypatch):
    """Every process starts from the run's seed (set_seed: the weights they build must agree). The two processes of
    a group then run the same layers on chunks of one shape: without a stream of their own they drop the same
    positions of every chunk, tokens a chunk apart together, which the unsplit row never does (LoRA's default
    dropout is 0.05). Without sequence parallelism the run's random stream is left as it was."""
    from accelerate.utils import set_seed

    masks = []
    for rank in (0, 1):
        monkeypatch.setattr(sequence_parallel, "_current", sequence_parallel.plan(2, rank, 2))
        set_seed(7)  # what loop/train.py does on every process
        torch.rand(10)  # building the model draws from it alike on both
        sequence_parallel.own_dropout(7)
        masks.append(torch.nn.functional.dropout(torch.ones(4096), 0.5) == 0)
    assert not torch.equal(*masks) and 0.4 < (masks[0] == masks[1]).float().mean() < 0.6  # independent halves
    monkeypatch.setattr(sequence_parallel, "_current", sequence_parallel.NONE)
    set_seed(7)
    before = torch.get_rng_state()
    sequence_parallel.own_dropout(7)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_row_split_over_two_processes_gives_the_loss_and_gradients_of_the_whole_row(family_dirs, tmp_path):
    """Two processes over gloo, each model family's attention kind (grouped-query Qwen3, multi-query GPTBigCode),
    both packed layouts (SDPA per dialogue on the flattened row, SDPA under the block mask): the summed
    cross-entropy and every parameter's gradient, and each packed sequence's log-probability with the gradient of
    a loss over them (preference tuning's case), with the row split between the processes and added up over
    them, equal the whole row's."""
    report = on_two_processes("sequence_parallel_worker.py", family_dirs, ("qwen3", "gpt_bigcode"), tmp_path)
    assert sorted(report) == ["gpt_bigcode/sdpa", "gpt_bigcode/sdpa_varlen", "qwen3/sdpa", "qwen3/sdpa_varlen"]
    for case, quantities in report.items():
        for what, (difference, scale) in zip(("loss", "gradients", "log-probs", "their gradients"), quantities):
            assert scale > 0 and difference <= 1e-5 * max(1.0, scale), (case, what, difference, scale)


def test_sliding_windows_fillers_rows_without_targets_and_routers_split_as_the_whole_row(family_dirs, tmp_path):
    """Two processes over gloo (about 8 s), what the test above does not reach: dialogues longer than the tiny
    models' 64-token sliding window (Qwen2: a window on some layers, a mask per layer type), three rows a
    micro-batch with an empty filler, gradient checkpointing, a row whose second chunk holds no target through the
    plain logits, and a mixture of experts' router statistics (assignments, probabilities with their gradient,
    entropy) from each process's `token_index`: split and added up over the processes, the whole rows'."""
    report = on_two_processes("sequence_parallel_cases_worker.py", family_dirs, ("qwen2", "qwen3_moe"), tmp_path)
    assert len(report) == 2 * 2 * 2
    for case, quantities in report.items():
        assert len(quantities) == (5 if "moe" in case else 2), case
        for what, (difference, scale) in zip(("loss", "gradients", "assignments", "probabilities", "entropy"),
                                             quantities):
            assert scale > 0 and difference <= 1e-5 * max(1.0, scale), (case, what, difference, scale)


def test_a_run_with_rows_split_resumes_without_and_steps_as_it_would_have(tiny_dir, tmp_path):
    """Two launches of 2-process ZeRO-3 (float32, about 20 s each). The first splits every row over both
    processes (one data-parallel group, 2 accumulation steps), with gradient checkpointing, and checkpoints at
    steps 2 and 4. The second resumes its step-2 checkpoint without sequence parallelism (two groups: the
    accumulation goes to 1, the same rows a step) and trains steps 3 and 4: the same state and rows, split or
    not, give the same loss, gradient norm and held-out loss, so the split changes nothing. The split run's
    last checkpoint consolidates to exactly its final model, and its model card says how it ran."""
    from safetensors.torch import load_file

    from loop.state import checkpoints, export
    from tests.conftest import launch, scalars, write_config

    split, plain = tmp_path / "split", tmp_path / "plain"
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, split, model={"gradient_checkpointing": True},
                       training={"max_steps": 4, "save_every": 2, "keep_last": 5, "log_every": 1, "eval_every": 4},
                       output={"save_dtype": "fp32"}, parallelism={"sequence_parallel_size": 2})
    launch(cfg, mixed_precision="no")
    launch(cfg, "--output_dir", str(plain), "--parallelism.sequence_parallel_size", "1", "--resume_from_checkpoint",
           str(split / "checkpoints" / "step_00000002"), mixed_precision="no")
    log = (plain / "train.log").read_text()
    assert "was written by 2 processes (1 data-parallel groups of 2) and this run has 2: the accumulation steps " \
           "set to 1 (from 2)" in log
    a, b = scalars(split), scalars(plain)
    for name in ("train/loss", "train/grad_norm", "eval/loss"):
        steps = [3, 4] if name.startswith("train") else [4]
        assert [s for s, _ in b[name]] == steps, name
        for step in steps:
            assert dict(b[name])[step] == pytest.approx(dict(a[name])[step], rel=1e-5), (name, step)
    assert dict(a["train/loss"])[4] < dict(a["train/loss"])[1]
    export.from_checkpoint(checkpoints.find("latest", split / "checkpoints"), tmp_path / "m", dtype="fp32")
    final, consolidated = (load_file(d / "model.safetensors") for d in (split / "final", tmp_path / "m"))
    assert final.keys() == consolidated.keys() and all(torch.equal(final[k], v) for k, v in consolidated.items())
    assert "sequence parallel" in (split / "final" / "README.md").read_text()


def test_a_split_the_model_or_the_attention_cannot_take_is_refused_in_one_line(tiny_dir, tmp_path):
    from loop import config
    from loop.model import load
    from tests.conftest import write_config

    path = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out")
    cfg = config.from_file(path)
    cfg.parallelism.sequence_parallel_size = 3  # the tiny model has 4 query heads and 1 key/value head
    with pytest.raises(ConfigError, match=r"^parallelism.sequence_parallel_size: the model's 4 attention heads do "
                                          r"not divide by sequence_parallel_size 3 \(.*tiny.*/model\)$"):
        load.preflight(cfg)
    with pytest.raises(ConfigError, match="^parallelism.sequence_parallel_size: eager attention cannot take a split "
                                          "row"):
        config.from_argv([str(path), "--parallelism.sequence_parallel_size", "2", "--attn_implementation", "eager",
                          "--packing", "pad"])
