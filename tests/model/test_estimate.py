import json
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from loop.model import estimate
from loop.model.architecture import Shape
from tests.conftest import run_in_process, write_config


def test_parameter_count_matches_the_real_model(tiny_dir):
    model_config = estimate.read_config(str(tiny_dir / "model"))
    total, largest = estimate.count_params(model_config)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    assert total == sum(p.numel() for p in model.parameters())
    assert largest == model_config.vocab_size * model_config.n_embd  # the (tied) embedding is the largest layer


def test_a_mixture_of_experts_block_is_one_layer_gathered_whole(family_dirs):
    """A full fine-tune gathers each transformer block at once (a ZeRO-3 leaf module): a mixture of experts'
    block with every expert in it is the largest thing gathered, not the packed experts alone."""
    model_config = estimate.read_config(str(family_dirs("qwen3_moe") / "model"))
    model_config.num_experts = 64  # the block outgrows the embedding
    total, largest = estimate.count_params(model_config)
    model = AutoModelForCausalLM.from_config(model_config)
    block = model.model.layers[0]
    assert largest == sum(p.numel() for p in block.parameters()) > sum(p.numel() for p in block.mlp.parameters())
    assert total == model.num_parameters()


def test_the_qwen3_coder_30b_a3b_recipes_fit_the_gpus_they_name():
    """configs/qwen3-coder-30b-a3b.yaml (8 x 80 GB, micro-batch 1) and its LoRA recipe on one 80 GB GPU, from the
    published shape alone; micro-batch 2 would not leave room on 80 GB."""
    shape = str(Path(__file__).parents[2] / "configs" / "models" / "qwen3-coder-30b-a3b.json")
    head, full, *_ = estimate.estimate(shape, 8, 1, 1, 4096, True)
    assert 30.4e9 < head["params"] < 30.7e9 and 600e6 < head["largest_layer"] < 650e6  # a block, every expert
    assert 65 < full["gpu_gb"] < 76
    assert estimate.estimate(shape, 8, 1, 2, 4096, True)[1]["gpu_gb"] > 76
    _, lora = estimate.estimate(shape, 1, 1, 1, 4096, True, lora_rank=16)
    assert 60 < lora["gpu_gb"] < 72


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_estimates_move_the_right_way(tiny_dir, engine):
    shape = Shape.of(estimate.read_config(str(tiny_dir / "model")))
    plain = estimate.activations_bytes(shape, 4, 512, checkpointing=False)
    assert estimate.activations_bytes(shape, 8, 512, False)["activations"] == 2 * plain["activations"]
    assert estimate.activations_bytes(shape, 4, 512, True)["activations"] < plain["activations"]
    head, *rows = estimate.estimate(str(tiny_dir / "model"), 8, 1, 4, 512, False, engine=engine)
    gpu = [r["model_states_gpu_gb"] for r in rows]
    cpu = [r["cpu_gb_per_node"] for r in rows]
    assert gpu == sorted(gpu, reverse=True) and cpu[1] <= cpu[2]  # offloading moves states from GPU to CPU
    more_gpus = estimate.estimate(str(tiny_dir / "model"), 16, 1, 4, 512, False, engine=engine)[1][
        "model_states_gpu_gb"]
    assert more_gpus < rows[0]["model_states_gpu_gb"]


@pytest.mark.parametrize("family", ["gpt_bigcode", "qwen2"])
def test_a_deep_model_is_counted_from_two_of_its_layers_exactly(family_dirs, family):
    """Past 64 layers the count is extrapolated (building 10,000 layers takes seconds even on the meta device);
    Qwen2's per-layer attention types are cut along."""
    model_config = estimate.read_config(str(family_dirs(family) / "model"))
    model_config.num_hidden_layers = 70
    if family == "qwen2":
        model_config.layer_types = ["full_attention"] * 35 + ["sliding_attention"] * 35
    assert estimate.count_params(model_config) == estimate._count(model_config, False)


def absurd(tiny_dir: Path, folder: Path, **changes) -> Path:
    """The tiny model's config, changed: no weights, no tokenizer, as nothing else is read before the refusal."""
    folder.mkdir()
    config = json.loads((tiny_dir / "model" / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, said", [
    ({"n_embd": 1_000_000}, "largest layer 10,500,011,500,000: that layer alone takes 19,557.8 GB in 16 bits"),
    ({"n_layer": 10_000, "n_embd": 4096}, "training it needs at least"),
    ({"vocab_size": 1_000_000_000}, "largest layer 64,000,000,000: that layer alone takes 119.2 GB"),
])
def test_an_absurd_model_config_is_refused_before_anything_is_allocated_or_written(tiny_dir, tmp_path, capsys,
                                                                                   changes, said):
    """Hidden size 1e6, 10,000 layers, a vocabulary of 1e9 (issue 25): one line with the figures, exit 2, within
    seconds (the model is only counted, on the meta device), before the data is read, and nothing written."""
    model = absurd(tiny_dir, tmp_path / "model", **changes)
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", model={"name_or_path": str(model)})
    started = time.time()
    assert run_in_process(cfg, entry="run") == 2
    assert time.time() - started < 20
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "error:" in line]
    assert said in line and "parameters" in line and "check its hidden size, layers and vocabulary" in line
    assert "Traceback" not in out and " data: " not in out
    assert not (tmp_path / "out").exists()


def test_a_long_row_s_activations_divide_by_the_processes_sharing_it():
    """Sequence parallelism N: each GPU holds 1/N of the row's activations and loss head, plus the attention's
    all-to-all buffers; offloaded checkpoints leave one layer input on the GPU and the rest on the host; a tiled
    MLP keeps one slice of the MLP's part. The defaults give the figures the estimate always gave."""
    shape = Shape.of(estimate.read_config(str(Path(__file__).parents[2] / "configs" / "models" /
                                              "qwen2.5-coder-7b.json")))
    one = estimate.activations_bytes(shape, 1, 65536, True)
    assert one["activations"] == 2 * 65536 * shape.hidden * shape.layers + 34 * 65536 * shape.hidden
    assert one["all_to_all"] == one["host"] == 0
    two = estimate.activations_bytes(shape, 1, 65536, True, estimate.Long(sequence_parallel=2))
    assert two["activations"] == one["activations"] / 2 and 0 < two["all_to_all"] < two["activations"] / 5
    off = estimate.activations_bytes(shape, 1, 65536, True, estimate.Long(offload_checkpoints=True))
    assert off["activations"] + off["host"] == one["activations"]
    assert off["host"] == 2 * 65536 * shape.hidden * (shape.layers - 1)
    tiled = estimate.activations_bytes(shape, 1, 65536, True, estimate.Long(tiled_mlp=8))
    assert one["activations"] > tiled["activations"] > one["activations"] - 19 * 65536 * shape.hidden


def test_the_tool_prints_the_peak_per_gpu_for_a_128k_row(capsys):
    """tools/estimate_memory.py for Qwen2.5-Coder-7B on 8 GPUs at 128k tokens: each row over 8 GPUs with
    offloaded checkpoints and a tiled MLP fits an 80 GB GPU without offloading the model states; on one GPU a
    row is over 8 times the activations."""
    from tools import estimate_memory

    shape = str(Path(__file__).parents[2] / "configs" / "models" / "qwen2.5-coder-7b.json")
    common = [shape, "--gpus-per-node", "8", "--micro-batch", "1", "--seq-len", "131072", "--checkpointing",
              "--offload-checkpoints", "--tiled-mlp", "8"]
    assert estimate_memory.main([*common, "--sequence-parallel", "8"]) == 0
    out = capsys.readouterr().out
    assert "each row over 8 GPUs" in out and "all-to-all" in out and "offloaded to CPU" in out
    peak = float(next(line for line in out.splitlines() if line.startswith("no offload")).split()[2])
    assert 20 < peak < 40
    head = estimate.estimate(shape, 8, 1, 1, 131072, True, long=estimate.Long(1, True, 8))[0]
    split = estimate.estimate(shape, 8, 1, 1, 131072, True, long=estimate.Long(8, True, 8))[0]
    assert split["parts"]["activations"] < head["parts"]["activations"] / 7
    with pytest.raises(SystemExit):
        estimate_memory.main([*common, "--sequence-parallel", "3"])  # 3 does not divide 8 GPUs
