"""Parameter-efficient fine-tuning through peft, in the same loop: LoRA adapters on a frozen base, or on
a 4-bit base (QLoRA, bitsandbytes).

Only the adapters (and, when asked or needed, token embeddings) train, so the optimizer holds a few
million parameters, the backward pass computes no weight gradients for the base, and checkpoints hold
only what trains (the base is the model the run started from). At the end the run writes the adapter
as peft saves it and, unless told not to, the base with the adapter merged in.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from loop.config import Config, ConfigError, LoraSettings
from loop.data import templates
from loop.engine import registry

log = logging.getLogger("loop")
ADAPTER_CONFIG = "adapter_config.json"
# Importing peft imports bitsandbytes, which on any CPU with AVX512-BF16 (GPU machines' too) warns that an
# optional kernel for 4-bit matmuls on the CPU cannot be fetched from the Hub: a line at every LoRA run
# about a path that only CPU QLoRA takes, and it still works without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward"))

# The linear layers adapted by default: every projection of attention and MLP, per architecture.
TARGETS = {
    "gpt_bigcode": ["c_attn", "c_proj", "c_fc"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # A mixture of experts' experts are packed tensors, not linear layers: attention is adapted (the usual
    # recipe for Qwen3-MoE), the frozen experts and router are not.
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def targets(settings: LoraSettings, model_type: str) -> list[str] | str:
    if settings.target_modules == ["auto"]:
        return TARGETS.get(model_type, "all-linear")
    return "all-linear" if settings.target_modules == ["all-linear"] else settings.target_modules


def check(cfg: Config) -> None:
    """What cannot run, refused before any weight is loaded."""
    import importlib.util

    if cfg.lora.enabled and cfg.lora.quantize == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora.quantize: 4bit needs bitsandbytes (pip install bitsandbytes; on CPU it "
                                 "runs from version 0.45)")


def quantization(cfg: Config):
    """from_pretrained's quantization_config for QLoRA (NF4, double quantization, bf16 compute), or None."""
    if not (cfg.lora.enabled and cfg.lora.quantize == "4bit"):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def wrap(model, settings: LoraSettings, added_tokens: list[int]):
    """The model with LoRA adapters on its base. Token rows the template added are trained with them
    (their embeddings start random), unless the whole embedding trains."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if settings.quantize == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():  # bitsandbytes 0.50 repacks 4-bit weights for CPU inference on the first
            if hasattr(module, "support_avx512bf16_for_cpu"):  # eval() forward and never back: training after
                module.support_avx512bf16_for_cpu = False  # an evaluation would then fail
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    output = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output), None)
    tied = output is not None and output.weight is embed.weight
    saved = [embed_name.rsplit(".", 1)[-1]] + ([] if tied or output_name is None else [output_name.rsplit(".", 1)[-1]])
    peft_config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, task_type="CAUSAL_LM",
        target_modules=targets(settings, model.config.model_type),
        modules_to_save=saved if settings.train_embeddings else None,
        trainable_token_indices=added_tokens if added_tokens and not settings.train_embeddings else None,
        ensure_weight_tying=tied and (settings.train_embeddings or bool(added_tokens)))
    with quiet_peft():
        return get_peft_model(model, peft_config)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads `is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning each
    time: a line on the user's terminal about two libraries' code, with nothing for them to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def save_adapter(peft_model, state_dict: dict, folder: Path, tokenizer) -> None:
    """The adapter as peft writes it (adapter_model.safetensors, adapter_config.json), with the tokenizer."""
    peft_model.save_pretrained(folder, state_dict=state_dict)
    templates.save_tokenizer(tokenizer, folder)


def load_base(base_name: str, vocab: int, revision: str | None = None, trust_remote_code: bool = False):
    """The base model as the run loaded it (float32, the template's tokens added), as a plain model in
    this process's memory."""
    from transformers import AutoModelForCausalLM

    with registry.outside_init():  # on the main process alone, also under a ZeRO-3 run
        base = AutoModelForCausalLM.from_pretrained(base_name, revision=revision, trust_remote_code=trust_remote_code,
                                                    dtype=torch.float32)
    if base.get_input_embeddings().weight.shape[0] != vocab:  # the template's tokens were added
        base.resize_token_embeddings(vocab)
    return base


def base_changes(trained_state: dict[str, torch.Tensor], base) -> list[str]:
    """The frozen base weights that differ from the base model's own: there must be none. Compared in the
    trained model's precision (the run's bf16 copy of the base is exactly the cast of the original)."""
    own = base.state_dict()
    changed = []
    for key, value in trained_state.items():
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if any(part in key for part in ("lora_", "modules_to_save", "trainable_tokens")) or name not in own:
            continue
        if value.shape == own[name].shape and not torch.equal(value.cpu(), own[name].to(value.dtype)):
            changed.append(name)
    return changed


def merge(base, adapter_folder: Path):
    """The base with the adapter merged into its weights, in float32, a plain transformers model."""
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(base, adapter_folder).merge_and_unload()
