"""A checked, loadable model folder, from the live model at the end of training or from a checkpoint of any
engine (its reader streams the weights: consolidate.py): safetensors weights, config, tokenizer with its chat
template, and a generation config that stops at the template's end token.

Every export is written into a temporary folder beside its destination (`staged`), checked against
the model's full parameter shapes, and only then renamed into place: nothing that looks like a
finished model is left behind by a failure (a full disk included). A checkpoint is exported only when it
is complete and intact (checkpoints.usable), and its step is its loop state's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from loop.config import RunError, SaveDtype, first_line
from loop.data import templates
from loop.engine import registry
from loop.engine.safe_load import ConsolidationError
from loop.state import checkpoints

if TYPE_CHECKING:  # tools that only read checkpoints need not import accelerate / transformers
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What a checkpoint holds besides weights, copied into an exported model folder.
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


class ExportError(RunError, RuntimeError):
    """The model could not be exported; the message names the file or parameter."""


@dataclass
class Exported:
    """What an export from a checkpoint read and wrote."""

    checkpoint: Path  # the checkpoint read (for a run's checkpoints/ folder, its newest intact one)
    step: int  # from its loop state
    aliases: dict[str, str]  # tied weights, written once
    passed_over: list[str]  # newer checkpoints that were broken, each with why


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that replaces `out` only if the block completes; a disk that is full
    or cannot be written is an ExportError, and nothing is left behind."""
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = _write_failure(e, out)
        if why:
            raise ExportError(f"cannot write {out}: {why}; nothing was left there") from None
        raise


def _write_failure(error: BaseException, out: Path) -> str | None:
    """What stopped the writing when it was the disk (full, read-only, no permission); None for the rest.
    safetensors reports a full disk as its own error, so the free space is looked at too."""
    if not isinstance(error, Exception) or isinstance(error, (ExportError, ConsolidationError)):
        return None
    full = checkpoints.no_space(error, out.parent)
    return full or (first_line(error) if isinstance(error, OSError) else None)


def readable(folder: Path) -> None:
    """0755 folders and 0644 files, like the rest of a run's output: some writers (safetensors through
    transformers) create 0600 files, which teammates on a shared filesystem cannot read."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Full shape of every parameter, also when ZeRO-3 has partitioned it (`ds_shape`)."""
    return {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}


def saved_shapes(model: torch.nn.Module, expected: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The names and shapes `save_pretrained` writes for these parameters. transformers 5 keeps some weights
    in another layout than their checkpoints (a mixture of experts' experts packed into one tensor per layer)
    and writes them back in the published layout (one matrix per expert): its own reverse conversion, applied
    to shape-only tensors, says what the folder must hold."""
    from transformers.core_model_loading import revert_weight_conversion

    meta = {name: torch.empty(shape, device="meta") for name, shape in expected.items()}
    return {name: tuple(t.shape) for name, t in revert_weight_conversion(model, meta).items()}


def check_saved_model(model_dir: Path, expected: dict[str, tuple[int, ...]], tied: set[str]) -> None:
    """Every parameter is in the safetensors files with its full shape (tied ones may be left out).

    Catches the classic ZeRO-3 failure: placeholders of shape (0,) saved as if they were weights.
    """
    written: dict[str, tuple[int, ...]] = {}
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                written[key] = tuple(f.get_slice(key).get_shape())
    if not written:
        raise ExportError(f"{model_dir}: no safetensors weights were written")
    problems = [f"{k}: missing" for k in expected if k not in written and k not in tied]
    problems += [f"{k}: shape {written[k]} != {s}" for k, s in expected.items() if k in written and written[k] != s]
    if problems:
        raise ExportError(f"{model_dir}: saved model does not match its config: " + "; ".join(problems[:10]))


def save_model(accelerator: Accelerator, model, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
               dtype: SaveDtype) -> None:
    """Save the live model. Must be called on every process: gathering ZeRO-3 shards is a collective."""
    state_dict = registry.of(accelerator).full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        expected = saved_shapes(unwrapped, expected_shapes(unwrapped))
        tied = {"lm_head.weight"} if getattr(unwrapped.config, "tie_word_embeddings", False) else set()
        with staged(out_dir) as tmp:
            state_dict = {k: v.to(DTYPES[dtype]) for k, v in state_dict.items()}
            unwrapped.config.dtype = DTYPES[dtype]
            # transformers empties the dict it is given, so pass a copy.
            unwrapped.save_pretrained(tmp, state_dict=dict(state_dict))
            templates.save_tokenizer(tokenizer, tmp)
            check_saved_model(tmp, expected, tied)
    accelerator.wait_for_everyone()


def save_final(accelerator: Accelerator, model, tokenizer: PreTrainedTokenizerBase, out: Path, cfg) -> dict[str, Path]:
    """The run's final outputs, by kind: "model" (final/) for full fine-tuning; with LoRA, "adapter"
    (adapter/: what peft loads onto the base) and, unless lora.merge is off, "merged model" (final/).
    Must be called on every process: gathering ZeRO-3 shards is a collective."""
    if not cfg.lora.enabled:
        save_model(accelerator, model, tokenizer, out / "final", cfg.output.save_dtype)
        return {"model": out / "final"}
    from loop.model import lora

    state_dict = registry.of(accelerator).full_state_dict(accelerator, model)
    saved = {"adapter": out / "adapter"}
    if accelerator.is_main_process:
        with staged(out / "adapter") as tmp:
            lora.save_adapter(accelerator.unwrap_model(model), state_dict, tmp, tokenizer)
        if cfg.lora.merge:
            base = lora.load_base(cfg.model.name_or_path, accelerator.unwrap_model(model).config.vocab_size,
                                  cfg.model.revision, cfg.model.trust_remote_code)
            changed = [] if cfg.lora.quantize == "4bit" else lora.base_changes(state_dict, base)  # 4-bit: no match
            if changed:
                raise ExportError(f"the frozen base changed during training ({', '.join(changed[:5])}); not merged")
            merged = lora.merge(base, out / "adapter")
            merged.generation_config = accelerator.unwrap_model(model).generation_config
            save_plain(merged, tokenizer, out / "final", cfg.output.save_dtype)
            saved["merged model"] = out / "final"
    accelerator.wait_for_everyone()
    return saved


def save_plain(model, tokenizer: PreTrainedTokenizerBase, out_dir: Path, dtype: SaveDtype) -> None:
    """A whole model already in this process's memory (a merged adapter), staged and checked."""
    expected = saved_shapes(model, expected_shapes(model))
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    with staged(out_dir) as tmp:
        model.to(DTYPES[dtype]).save_pretrained(tmp)
        templates.save_tokenizer(tokenizer, tmp)
        check_saved_model(tmp, expected, tied)


def from_checkpoint(ckpt: Path, out: Path, dtype: SaveDtype = "bf16", max_shard_bytes: int = 5 * 1024**3,
                    progress: Callable[[str, int], None] | None = None) -> Exported:
    """Export a complete, intact training checkpoint of any engine (ZeRO-3 shards, or whole weights from a run
    without DeepSpeed; a run's checkpoints/ folder gives its newest intact one). CheckpointError when there is none."""
    from loop.model import lora

    ckpt, state, passed_over = checkpoints.usable(ckpt)
    if (ckpt / lora.ADAPTER_CONFIG).is_file():
        aliases = _adapter_from_checkpoint(ckpt, out)
    else:
        aliases = _model_from_checkpoint(ckpt, out, dtype, max_shard_bytes, progress)
    return Exported(ckpt, state.step, aliases, passed_over)


def _model_from_checkpoint(ckpt: Path, out: Path, dtype: SaveDtype, max_shard_bytes: int,
                           progress: Callable[[str, int], None] | None) -> dict[str, str]:
    from loop.state import consolidate

    with staged(out) as tmp:
        aliases, expected = consolidate.write(ckpt, tmp, DTYPES[dtype], max_shard_bytes, progress)
        check_saved_model(tmp, expected, set(aliases))
        for meta in META_FILES:
            if (ckpt / meta).is_file():
                shutil.copy2(ckpt / meta, tmp / meta)
        _set_config_dtype(tmp / "config.json", DTYPES[dtype])
    return aliases


def _adapter_from_checkpoint(ckpt: Path, out: Path) -> dict[str, str]:
    """A LoRA checkpoint holds the trainable weights under peft's in-memory names: write them as peft saves
    an adapter (names mapped by peft itself, on a skeleton of the model that holds no weights)."""
    from loop.model import lora  # noqa: I001  (lora first: it quiets what importing peft says)
    from loop.state import consolidate
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    trained = consolidate.state_dict(ckpt)
    peft_config = PeftConfig.from_pretrained(ckpt)
    with torch.device("meta"), lora.quiet_peft():
        bare = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
        bare.name_or_path = peft_config.base_model_name_or_path  # else peft names the checkpoint as the base
        skeleton = get_peft_model(bare, peft_config)
    adapter = get_peft_model_state_dict(skeleton, state_dict=trained)
    with staged(out) as tmp:
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        peft_config.save_pretrained(tmp)
        for meta in META_FILES:
            if (ckpt / meta).is_file() and meta != "config.json":
                shutil.copy2(ckpt / meta, tmp / meta)
    return {}


def merged_from_checkpoint(ckpt: Path, out: Path, dtype: SaveDtype = "bf16") -> Exported:
    """From a complete, intact LoRA checkpoint, the base model (named in its run config) with the adapter
    merged in."""
    from transformers import AutoTokenizer

    ckpt, state, passed_over = checkpoints.usable(ckpt)
    save_plain(merged_model(ckpt), AutoTokenizer.from_pretrained(ckpt), out, dtype)
    return Exported(ckpt, state.step, {}, passed_over)


def merged_model(ckpt: Path):
    """A LoRA checkpoint's base with its adapter merged in, in memory (float32, plain transformers); the
    caller has checked the checkpoint (checkpoints.usable)."""
    import tempfile

    import yaml
    from transformers import AutoConfig, GenerationConfig

    from loop.model import lora

    run = yaml.safe_load((ckpt / "run_config.yaml").read_text())["model"]
    with tempfile.TemporaryDirectory() as work:
        _adapter_from_checkpoint(ckpt, Path(work) / "adapter")
        base = lora.load_base(run["name_or_path"], AutoConfig.from_pretrained(ckpt).vocab_size, run.get("revision"),
                              run.get("trust_remote_code", False))
        model = lora.merge(base, Path(work) / "adapter")
    model.generation_config = GenerationConfig.from_pretrained(ckpt)
    return model


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    if path.is_file():
        config = json.loads(path.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        path.write_text(json.dumps(config, indent=2))
