from transformers import AutoModelForCausalLM

from loop.model import estimate
from loop.model.architecture import Shape


def test_parameter_count_matches_the_real_model(tiny_dir):
    model_config = estimate.read_config(str(tiny_dir / "model"))
    total, largest = estimate.count_params(model_config)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    assert total == sum(p.numel() for p in model.parameters())
    assert largest == model_config.vocab_size * model_config.n_embd  # the (tied) embedding is the largest layer


def test_estimates_move_the_right_way(tiny_dir):
    shape = Shape.of(estimate.read_config(str(tiny_dir / "model")))
    plain = estimate.activations_bytes(shape, 4, 512, checkpointing=False)
    assert estimate.activations_bytes(shape, 8, 512, False)["activations"] == 2 * plain["activations"]
    assert estimate.activations_bytes(shape, 4, 512, True)["activations"] < plain["activations"]
    head, *rows = estimate.estimate(str(tiny_dir / "model"), 8, 1, 4, 512, False)
    gpu = [r["model_states_gpu_gb"] for r in rows]
    cpu = [r["cpu_gb_per_node"] for r in rows]
    assert gpu == sorted(gpu, reverse=True) and cpu[1] <= cpu[2]  # offloading moves states from GPU to CPU
    more_gpus = estimate.estimate(str(tiny_dir / "model"), 16, 1, 4, 512, False)[1]["model_states_gpu_gb"]
    assert more_gpus < rows[0]["model_states_gpu_gb"]
