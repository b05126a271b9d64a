"""Loading a model ready to train: its config first (every check before any weight), then the tokenizer,
then the weights with the attention that keeps packed dialogues apart, room for the template's tokens, a
generation config that stops at the end token, LoRA adapters when asked, and the loss head."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from loop.config import Config, ConfigError, first_line
from loop.data.records import DataError, check_exists
from loop.engine import registry
from loop.engine.interface import Engine
from loop.model import attention, estimate, head, lora, memory, sequence_parallel
from loop.model.architecture import Shape, check_trainable


def read_model_config(cfg: Config):
    """The model's config alone (no weights), or one line saying what is missing."""
    from transformers import AutoConfig

    name = cfg.model.name_or_path
    try:
        check_exists(name)
    except DataError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {name} holds no config.json (is it a model folder?)")
    try:
        return AutoConfig.from_pretrained(name, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        where = "" if Path(name).exists() else " (not found locally, so it was read as a Hub model id)"
        raise ConfigError(f"model.name_or_path: cannot read {name}'s config{where}: {first_line(e)}") from None


def preflight(cfg: Config, dropout: bool = True) -> tuple[object, str, list[str]]:
    """Everything a run checks about its model before loading any weight: (the model's config, the attention
    that will be used, warnings). The run, tools/launch.py and tools/inspect_data.py all call this; `dropout`
    False: the objective trains without it (see load_model)."""
    model_config = read_model_config(cfg)
    dropout = attention.attention_dropout(model_config) if dropout else 0.0
    attn, fallback = attention.resolve(cfg.model.attn_implementation, dropout)
    unverified = check_trainable(model_config, cfg, attn)
    lora.check(cfg)
    shape, size = Shape.of(model_config), cfg.parallelism.sequence_parallel_size
    if size > 1 and (why := sequence_parallel.check_heads(shape.q_heads, shape.kv_heads, size)):
        raise ConfigError(f"parallelism.sequence_parallel_size: {why} ({cfg.model.name_or_path})")
    return model_config, attn, [w for w in (fallback, unverified) if w]


def check_memory(model_config, cfg: Config, accelerator=None) -> None:
    """Refuse a model this machine cannot hold, before anything is allocated or written (estimate.py: the
    parameter count on the meta device against RAM and device memory). Without an accelerator (tools/launch.py,
    before launching) only the largest layer is checked: how the run will share the rest is not known yet."""
    import psutil

    name = cfg.model.name_or_path
    try:
        counts = estimate.count_params(model_config, cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - an impossible config fails inside the model class, in its own way
        raise ConfigError(f"model.name_or_path: {name}'s config does not make a model ({type(e).__name__}: "
                          f"{first_line(e, 200)})") from None
    device = accelerator.device if accelerator else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ram = psutil.virtual_memory().total
    on_gpu = device.type == "cuda"
    machine = estimate.Machine(ram, torch.cuda.get_device_properties(device).total_memory if on_gpu else ram, on_gpu)
    if accelerator is not None:
        engine = registry.of(accelerator)
        offload = engine.offloads(accelerator)
        machine.zero_stage, machine.processes = engine.zero_stage(accelerator), accelerator.num_processes
        machine.per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        machine.offload_to_disk = "nvme" in offload
    t = cfg.training
    long = estimate.Long(cfg.parallelism.sequence_parallel_size, cfg.model.offload_checkpoints, cfg.model.tiled_mlp)
    activations = estimate.on_device(estimate.activations_bytes(Shape.of(model_config), t.micro_batch_size,
                                                                cfg.data.seq_len, cfg.model.gradient_checkpointing,
                                                                long))
    per_param = 16 if not cfg.lora.enabled else 0.53 if cfg.lora.quantize == "4bit" else 2
    estimate.check_fits(counts, name, machine, per_param, activations)


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                             trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load {cfg.model.name_or_path}'s tokenizer "
                          f"({first_line(e)})") from None


def mean_rows(model: torch.nn.Module, vocab: int, engine: Engine) -> None:
    """The rows past `vocab` (the template's added tokens) of the input and output embeddings set to the mean of
    the rows before them, a neutral start that training moves (transformers' own resize samples
    around that mean)."""
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:  # tied: one matrix
        weights.append(out.weight)
    with engine.gathered(weights), torch.no_grad():
        for weight in weights:
            weight[vocab:] = weight[:vocab].mean(0, dtype=torch.float32).to(weight.dtype)


def load_model(cfg: Config, attn: str, tokenizer: PreTrainedTokenizerBase, added_tokens: list[int], end_token: str,
               accelerator, dropout: bool = True) -> torch.nn.Module:
    """The model from `model.name_or_path`, with the attention that keeps packed dialogues apart, room for
    the template's tokens, a generation config that stops at the end token, LoRA adapters when asked
    (lora.py), and the loss head, placed as the run's engine wants it. `dropout` False: every rate at 0, for
    an objective that trains without it (preference tuning)."""
    engine, device = registry.of(accelerator), accelerator.device
    zero_stage = engine.zero_stage(accelerator)
    quantization = lora.quantization(cfg)
    zero3 = zero_stage == 3
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=attn, quantization_config=quantization, dtype=weights_dtype(cfg, engine.master_weights),
        device_map={"": device} if quantization and not zero3 else None)  # ZeRO-3 places weights itself
    if added_tokens:
        old = model.get_input_embeddings().weight
        vocab = getattr(old, "ds_shape", old.shape)[0]  # its full size where ZeRO-3 holds only a shard
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        mean_rows(model, vocab, engine)
    model.generation_config = chat_generation_config(tokenizer, end_token)
    if cfg.model.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2's name for it
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not dropout:
        disable_dropout(model)
    if cfg.lora.enabled:
        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()  # the frozen embedding must still pass gradients back
        model = lora.wrap(model, cfg.lora, added_tokens)
    memory.apply(model, cfg.model)  # tiled MLP, offloaded checkpoints, where asked
    head.install_chunked_head(model, cfg.training.loss_chunk_tokens)
    sequence_parallel.own_dropout(cfg.training.seed)  # built: the processes sharing a row, each its own masks
    engine.place_model(accelerator, model, cfg.lora.enabled)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """No dropout in the model (as TRL's DPO default): the reference log-probabilities are computed without
    it, and dropout in the policy's would be noise in every reward. The saved config keeps the model's own
    rates; LoRA adapters, added after this, keep lora.dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):  # attention and residual rates kept as plain floats
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(module, name, 0.0)


def weights_dtype(cfg: Config, master_weights: bool) -> torch.dtype | str:
    """float32 for weights the optimizer updates itself; the checkpoint's own dtype ("auto") otherwise.

    transformers loads a checkpoint in the dtype it was saved in, and code models are saved in bf16.
    DeepSpeed keeps float32 master weights beside bf16 ones (`master_weights`), but without them (FSDP2, DDP,
    one process) the loaded weights are the optimizer's: bf16 there would silently drop every update under
    ~1/256 of a weight (and autocast, or FSDP2's mixed precision, needs float32 weights to cast from). A frozen
    LoRA base keeps its dtype: it is never updated, and halving it is the point of adapters.
    """
    return torch.float32 if not master_weights and not cfg.lora.enabled else "auto"


def chat_generation_config(tokenizer: PreTrainedTokenizerBase, end_token: str) -> GenerationConfig:
    """Generation stops at the template's end token, as the model was trained to."""
    return GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids(end_token),
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            max_new_tokens=256)
