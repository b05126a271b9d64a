"""The model card (README.md) written next to every saved model: how it was made, how to load it (the
snippet names what was actually saved: the Hub repo when pushed, else the folder), how to prompt it,
and the eval loss curve as a small plot."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from loop.data import templates
from loop.engine import registry
from loop.report.hub import repo_for

LOAD = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForCausalLM.from_pretrained("{where}", dtype="auto", device_map="auto")
```'''
LOAD_ADAPTER = '''```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto", device_map="auto"){resize}
model = PeftModel.from_pretrained(base, "{where}")
```'''
CHAT = '''```python
messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(model.device)
out = model.generate(**inputs, max_new_tokens=256, do_sample=True, temperature=0.2, top_p=0.95)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''
TOOLS = r'''The template renders tools, calls and results too, in the Hermes / Qwen2.5 layout that vLLM's `hermes`
tool parser reads (the tools in the system turn, a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
a result as `<tool_response>`); pass the tools as `apply_chat_template` takes them:

```python
import json, re

calculator = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                           "parameters": calculator}}]
messages = [{"role": "user", "content": "What is 17 * 23?"}]
inputs = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(model.device)
out = model.generate(**inputs, max_new_tokens=256, do_sample=False)
reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(reply)
for call in re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", reply, re.DOTALL):
    print("tool call:", call)  # {"name": ..., "arguments": {...}} as JSON; to answer it, append
    # {"role": "assistant", "tool_calls": [{"type": "function", "function": json.loads(call)}]},
    # then {"role": "tool", "content": RESULT}, and generate again
```'''


@dataclass
class RunSummary:
    """What the model card reports about the run; None where it was not measured."""

    world_size: int
    hardware: str
    setup: str = "one process"  # how the processes shared the work (DeepSpeed ZeRO-3, DDP)
    precision: str = "bf16"
    steps: int = 0
    tokens_trained: int = 0
    tokens_seen: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss), also before a resume
    eval_results: dict[str, float] = field(default_factory=dict)  # the last evaluation's scalars (eval/...)
    trainable: int = 0
    parameters: int = 0
    vocab: int = 0
    added_tokens: tuple[str, ...] = ()  # the tokens the chat template added to the vocabulary
    marked: bool = True  # the template marks its trained text (else the answers were found by rendering)
    code_scores: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # "humaneval pass@1" -> (step, x)
    code_note: str = ""  # how the evaluated programs ran (loop/evaluation/)


def run_setup(accelerator, cfg) -> tuple[str, str]:
    """(how the processes shared the work, the precision), for the model card."""
    machines = int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) // max(
        1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    where = f"{accelerator.num_processes} process(es) on {max(1, machines)} node(s)"
    if (size := cfg.parallelism.sequence_parallel_size) > 1:
        where += f", each row split over {size} of them (Ulysses sequence parallel)"
    shared = registry.of(accelerator).describe(accelerator)
    mixed = {"no": "fp32"}.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision))
    precision = f"{mixed} training, saved as {cfg.output.save_dtype}"
    if cfg.lora.enabled and cfg.lora.quantize == "4bit":
        precision += "; frozen base in 4-bit NF4"
    return f"{shared}, {where}", precision


def hardware(world_size: int) -> str:
    """What the run ran on, for the model card."""
    if torch.cuda.is_available():
        return f"{world_size} x {torch.cuda.get_device_name()}"
    return f"{world_size} CPU process(es)"


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "not measured"


def _own_card(folder: Path):
    """The model card of a local model folder, when it has one this library can read."""
    try:
        return ModelCard.load(folder / "README.md").data if (folder / "README.md").is_file() else None
    except Exception:  # noqa: BLE001 - a foreign README
        return None


def base_model(name_or_path: str) -> str | None:
    """The Hub id the run started from, for the card's metadata; for a local folder, its own card's base_model
    if it names one, else none (a local path means nothing on the Hub)."""
    if not Path(name_or_path).exists():
        return name_or_path
    named = getattr(_own_card(Path(name_or_path)), "base_model", None)
    return named if isinstance(named, str) and named else None


def base_license(name_or_path: str) -> str | None:
    """A local base model's license, from its own card (a Hub id's cannot be read offline)."""
    named = getattr(_own_card(Path(name_or_path)), "license", None) if Path(name_or_path).exists() else None
    return named if isinstance(named, str) and named else None


def shown(folder: Path) -> str:
    """A folder as a snippet names it: relative to the directory the run was started in when it is inside it
    (outputs/quickstart/final), else its absolute path."""
    resolved = folder.resolve()
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(resolved)


def loss_plot(evals: list[tuple[int, float]], path: Path, label: str = "eval loss") -> bool:
    """eval_loss.png: the held-out loss (or another score) over the run (False when matplotlib is not there
    or too few points)."""
    if len(evals) < 2:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    steps, values = zip(*sorted(evals))
    ax.plot(steps, values, marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def model_card(cfg, summary: RunSummary, chat_template: str, example: str, kind: str, folder: Path,
               objective: Mapping) -> ModelCard:
    """A README.md for `folder`, which holds the run's `kind` of output: "model", "adapter" or "merged model".
    `objective` is the objective's own section (loop/training/objective.py's CardSection: tags, hyperparameter
    rows, how the model was made, results, what the data held), as plain data: this stage does not import it."""
    kinds = ["adapter", "merged model"] if cfg.lora.enabled and cfg.lora.merge else [kind]
    where = repo_for(cfg.output.hub_model_id, kind, kinds) if cfg.output.push_to_hub else shown(folder)
    title = (where.rsplit("/", 1)[-1] if cfg.output.push_to_hub else
             Path(cfg.output.output_dir).resolve().name + ("-adapter" if kind == "adapter" else ""))
    hub_base = base_model(cfg.model.name_or_path)
    base = hub_base or cfg.model.name_or_path  # what the text and the snippets name
    datasets = sorted({s.path.partition(":")[0] for s in cfg.data.train_files if not Path(s.path).exists()})  # Hub
    lora = cfg.lora
    tags = ["starcoder", "code", "chat", *(["lora"] if lora.enabled else []), *(["qlora"] if lora.quantize == "4bit"
                                                                                else []),
            *objective["tags"]]
    license = cfg.output.license or base_license(cfg.model.name_or_path)
    data = ModelCardData(base_model=hub_base, datasets=datasets or None, license=license, tags=tags,
                         pipeline_tag="text-generation", library_name="peft" if kind == "adapter" else "transformers")
    t = cfg.training
    hyper = {"learning rate": t.lr, "schedule": f"{t.lr_schedule}, warm-up {t.warmup_steps or t.warmup_ratio}",
             "optimizer": f"AdamW (betas {t.adam_beta1}, {t.adam_beta2}, eps {t.adam_eps})",
             "weight decay": t.weight_decay,
             ("micro-batch per device" if cfg.parallelism.sequence_parallel_size == 1 else
              "micro-batch per data-parallel group (rows split over its processes)"): t.micro_batch_size,
             "gradient accumulation": t.gradient_accumulation_steps, "processes": summary.world_size,
             "distributed setup": summary.setup, "precision": summary.precision, "sequence length": cfg.data.seq_len,
             "packing": cfg.data.packing, "optimizer steps": summary.steps, "max grad norm": t.max_grad_norm,
             "seed": t.seed, "libraries": libraries(lora.enabled)}
    if lora.enabled:
        hyper |= {"LoRA": f"rank {lora.rank}, alpha {lora.alpha}, dropout {lora.dropout}, targets "
                          f"{', '.join(lora.target_modules)}{', embeddings trained' if lora.train_embeddings else ''}"
                          f"{', base in 4-bit NF4 (QLoRA)' if lora.quantize == '4bit' else ''}",
                  "trainable parameters": f"{summary.trainable:,} of {summary.parameters:,}"}
    hyper = {**objective["hyperparameters"], **hyper}
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyper.items())
    what = {"model": f"A chat model fine-tuned from `{base}`",
            "adapter": f"A LoRA adapter for `{base}`",
            "merged model": f"`{base}` with a LoRA adapter merged into its weights"}[kind]
    resize = (f"\nbase.resize_token_embeddings({summary.vocab})  # room for the chat template's tokens"
              if kind == "adapter" and summary.vocab else "")
    load = (LOAD_ADAPTER.format(where=where, base=base, resize=resize) if kind == "adapter"
            else LOAD.format(where=where))
    if kind == "adapter":  # module names (a mixture of experts' above all) change between transformers majors
        import transformers

        load += (f"\n\nTrained with transformers {transformers.__version__}: load it with transformers "
                 f"{transformers.__version__.split('.')[0]}.x, whose module names it was saved against.")
    plot = "\n![eval loss](eval_loss.png)\n" if loss_plot(summary.eval_losses, folder / "eval_loss.png") else ""
    code = code_section(summary, folder)
    # The parser that reads the calls back, named as vLLM's --tool-call-parser takes it (the snippet is Hermes')
    parser = templates.tool_parser(chat_template) if templates.renders_tools(chat_template) else None
    tools = f"\n{TOOLS}\n" if parser == "hermes" else ""
    if parser:
        tools += (f"\nServe it with tool calls read back by vLLM's `{parser}` parser: `vllm serve MODEL "
                  f"--enable-auto-tool-choice --tool-call-parser {parser}`.\n")
    marked = ("the same template with\nthe `{% generation %}` markers that picked the trained tokens is saved beside "
              "it as `\"training\"`\n(`apply_chat_template(messages, chat_template=\"training\", "
              "return_assistant_tokens_mask=True)`)." if summary.marked else
              "it has no markers: the trained tokens of each\nassistant turn were the ones it adds after the "
              "generation prompt, up to its end token (`loop/data/turns.py`).")
    if cfg.data.template_kwargs:
        marked += (f"\nIt was rendered with `{cfg.data.template_kwargs}`; pass the same to `apply_chat_template` "
                   "(and to the server).")
    added = (f"\n- Vocabulary: {len(summary.added_tokens)} token(s) added for the chat template "
             f"({', '.join(f'`{t}`' for t in summary.added_tokens)}), their embedding rows started as the mean of "
             "the existing rows and trained" if summary.added_tokens else "")
    trained = objective["trained"]
    results = (f"- Final train loss: {_loss(summary.train_loss)}; final eval loss: {_loss(summary.eval_loss)}"
               + objective["results"])
    body = f"""---
{data.to_yaml()}
---

# {title}

{what}, {trained}

## How to load and prompt it

{load}

The tokenizer carries the chat template the model was trained with (`{cfg.data.template}`);
`apply_chat_template` renders exactly the training format, for example:

```
{example}
```

Generation should stop at the end token; `generation_config.json` sets it as `eos_token_id`. The
template below (in `tokenizer_config.json`, where TGI reads it) is the default; {marked}

{CHAT}
{tools}
## Training

| hyperparameter | value |
|---|---|
{rows}

- Tokens trained (assistant tokens with a loss): {summary.tokens_trained:,} of {summary.tokens_seen:,} tokens processed
- Hardware: {summary.hardware}{added}
{results}
- Data: {", ".join(s.path + (f" (weight {s.weight:g})" if s.weight != 1 else "") for s in cfg.data.train_files)}
  ({objective["data"]})
{plot}{code}
<details><summary>Chat template (Jinja)</summary>

```jinja
{chat_template}
```
</details>
"""
    return ModelCard(body)


def libraries(adapters: bool) -> str:
    """The versions that trained it (an adapter loads onto the module names of its transformers major)."""
    from importlib.metadata import version

    names = ["transformers", *(["peft"] if adapters else []), "torch", "deepspeed", "accelerate"]
    return ", ".join(f"{name} {version(name)}" for name in names)


def code_section(summary: RunSummary, folder: Path) -> str:
    """Does it code: each score at its last evaluation, the table over the run's checkpoints, and its plot."""
    if not any(summary.code_scores.values()):
        return ""
    lines = ["", "## Code evaluation", "",
             f"The model's answers were run against the problems' tests, {summary.code_note} (`loop/evaluation/`).", ""]
    for metric, curve in summary.code_scores.items():
        step, last = max(curve)
        lines += [f"- {metric}: **{last:.3f}** at step {step}"]
        image = metric.replace(" ", "_").replace("@", "_at_") + ".png"
        if loss_plot(curve, folder / image, metric):
            lines += ["", f"![{metric}]({image})"]
        lines += ["", f"| step | {metric} |", "|---|---|", *(f"| {s} | {v:.3f} |" for s, v in sorted(curve)), ""]
    return "\n".join(lines) + "\n"
