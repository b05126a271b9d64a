"""What the loop knows about architectures: shapes through the standard names, FLOPs, and refusing what
it cannot train before any weight is loaded."""

import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, BloomConfig, GPT2Config, T5Config

from loop import config
from loop.model import architecture, estimate, flops
from tests.conftest import FAMILIES, ROOT, run_in_process, write_config


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_flops_follow_each_architecture(family_dirs, family):
    model = AutoModelForCausalLM.from_pretrained(family_dirs(family) / "model")
    shape = architecture.Shape.of(model.config)
    attn = model.model.layers[0].self_attn if family != "gpt_bigcode" else model.transformer.h[0].attn
    q_out = attn.q_proj.out_features if family != "gpt_bigcode" else attn.embed_dim
    assert shape.q_heads * shape.head_dim == q_out == 64 and shape.layers == 2
    assert shape.kv_heads == (1 if family == "gpt_bigcode" else 2)
    assert shape.windows == {"starcoder2": (64, 64), "qwen2": (None, 64)}.get(family, (None, None))
    # Matmul parameters: all but embedding lookups, the tied token embedding counting as the output projection.
    lookups = model.transformer.wpe.weight.numel() if family == "gpt_bigcode" else 0  # learned positions
    if not model.config.tie_word_embeddings:
        lookups += model.get_input_embeddings().weight.numel()
    assert flops.matmul_parameters(model) == model.num_parameters() - lookups
    cost = flops.training_flops(flops.matmul_parameters(model), shape, [100])
    assert cost > 6 * flops.matmul_parameters(model) * 100
    if family in ("starcoder2", "qwen2"):  # a window of 64 makes a 100-token dialogue's attention cheaper
        full = architecture.Shape(**{**shape.__dict__, "windows": (None, None)})
        assert cost < flops.training_flops(flops.matmul_parameters(model), full, [100])


@pytest.mark.slow
def test_the_memory_estimate_counts_what_the_loop_counts(family_dirs, tmp_path):
    """Two tool processes and the tiny Llama built (about 13 s on 2 shared cores): in the slow tier."""
    root = family_dirs("llama")
    model_config = estimate.read_config(str(root / "model" / "config.json"))  # a bare config.json works too
    total, _ = estimate.count_params(model_config)
    assert total == AutoModelForCausalLM.from_pretrained(root / "model").num_parameters()
    proc = subprocess.run([sys.executable, "tools/estimate_memory.py", str(tmp_path / "nowhere" / "config.json")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "tools/estimate_memory.py", "configs/models/starcoder2-15b.json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "15.958B parameters" in proc.stdout, proc.stderr[-2000:]


def cfg_for(**data):
    return config.Config(data=config.DataConfig(train_files=["x.jsonl"], **data))


def test_models_the_loop_cannot_train_are_refused_with_what_to_do():
    with pytest.raises(config.ConfigError, match="not a decoder-only causal language model"):
        architecture.check_trainable(T5Config(), cfg_for(), "sdpa")
    with pytest.raises(config.ConfigError, match="data.packing: pad"):  # Bloom's attention takes no packing layout
        architecture.check_trainable(BloomConfig(), cfg_for(), "sdpa")
    assert architecture.check_trainable(BloomConfig(), cfg_for(packing="pad"), "sdpa") is not None  # trainable, warned
    assert "not among the verified" in architecture.check_trainable(GPT2Config(), cfg_for(), "sdpa")
    with pytest.raises(config.ConfigError, match="data.seq_len: 4096 is above the model's context of 1024"):
        architecture.check_trainable(GPT2Config(n_positions=1024), cfg_for(seq_len=4096), "sdpa")


def test_refusal_comes_before_any_weight_is_read(tiny_dir, tmp_path):
    """A model folder that holds only an encoder-decoder config: refused by its config alone."""
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(tmp_path / "t5")
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", model={"name_or_path": str(tmp_path / "t5")})
    with pytest.raises(config.ConfigError, match="'t5' is not a decoder-only"):
        run_in_process(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert AutoConfig.from_pretrained(tmp_path / "t5") and not list((tmp_path / "t5").glob("*.safetensors"))


def test_a_bf16_checkpoint_trains_float32_weights_without_deepspeed(tiny_dir, tmp_path):
    """transformers loads a checkpoint in its saved dtype (code models ship bf16). Without DeepSpeed's float32
    master copy the loaded weights are the optimizer's: in bf16 an update below ~1/256 of a weight is lost."""
    import torch
    from safetensors.torch import load_file

    start = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.bfloat16)
    start.save_pretrained(tmp_path / "bf16")
    for f in (tiny_dir / "model").glob("tokenizer*"):
        (tmp_path / "bf16" / f.name).write_bytes(f.read_bytes())
    training = {"max_steps": 2, "lr": 1e-5, "warmup_steps": 0, "save_every": 2, "eval_every": 0, "sample_prompts": []}
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out",
                       model={"name_or_path": str(tmp_path / "bf16")}, training=training)
    assert run_in_process(cfg) == 0
    (saved,) = (tmp_path / "out" / "checkpoints").glob("step_*/model.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    after, before = load_file(saved)[name], start.state_dict()[name]
    assert after.dtype == torch.float32
    assert (after != before.float()).float().mean() > 0.9  # in bf16, 85% of them round away
