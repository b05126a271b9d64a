"""Starcoder2, Llama, Qwen2, Qwen3 and the mixtures of experts Qwen3-MoE and Qwen2-MoE (a shared expert beside
the routed ones) end to end under real 2-process ZeRO-3 (GPTBigCode: tests/test_train.py,
tests/state/test_checkpoints.py, tests/state/test_consolidate.py): a run resumes bit-identically from a
checkpoint, its checkpoints consolidate to exactly DeepSpeed's zero_to_fp32 weights (untied output projections
in Starcoder2, Llama and Qwen3-MoE, tied in Qwen2 and Qwen3), and the saved model chats with its template and
stops at `<|end|>`. Llama's and the Qwens' tokenizers lack the StarChat tokens: the run adds them and resizes
the embedding.

The mixtures of experts run with each rank's routers limited to its own half of the experts
(disjoint_routing/sitecustomize.py), the routing on which ZeRO-3 runs of other trainers hang: every step
finishes, with full fine-tuning and with LoRA (no leaf modules there). Qwen3 and Qwen3-MoE also train LoRA
adapters with DPO, which load and merge in plain transformers and peft.
"""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loop.data import preference
from loop.state import checkpoints, export
from tests.conftest import launch, scalars, write_config

pytestmark = pytest.mark.slow  # each family's run takes about a minute on two shared cores

FAMILIES = ("starcoder2", "llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
MOE = ("qwen3_moe", "qwen2_moe")
STEPS, SAVE_EVERY = 8, 4
PROBE = Path(__file__).parent / "disjoint_routing"


def run_config(family_root, out):
    return write_config(out.parent / f"{out.name}.yaml", family_root, out, model={"gradient_checkpointing": True},
                        training={"max_steps": STEPS, "save_every": SAVE_EVERY, "keep_last": 10, "log_every": 1,
                                  "eval_every": SAVE_EVERY, "lr": 3e-3})


@contextmanager
def disjoint_routing(record: Path):
    """Launch with each rank routing only to its own half of the experts; what each chose lands in `record`."""
    record.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "ROUTING_RECORD")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PROBE), *filter(None, [saved["PYTHONPATH"]])])
    os.environ["ROUTING_RECORD"] = str(record)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch_family(family: str, config: Path, *overrides: str) -> None:
    if family not in MOE:
        launch(config, *overrides)
        return
    with disjoint_routing(config.with_suffix(".routing")):
        launch(config, *overrides)


@pytest.fixture(scope="module")
def family_run(family_dirs, tmp_path_factory):
    """family -> (its tiny model's folder, a short run of it), each run made once."""
    runs = {}

    def run(family: str):
        if family not in runs:
            out = tmp_path_factory.mktemp(f"{family}-run") / "ref"
            launch_family(family, run_config(family_dirs(family), out))
            runs[family] = family_dirs(family), out
        return runs[family]

    return run


@pytest.fixture(scope="module")
def adapter_run(family_dirs, prepared, tmp_path_factory):
    """family -> (the base model's folder, a short DPO run with LoRA adapters on it, merged at the end). The base
    already holds the template's tokens (conftest's `prepared`): peft trains added tokens under ZeRO-3 with
    CUDA-only code (trainable_tokens' _collect_token_weights), which a CPU cannot run."""
    runs = {}

    def run(family: str):
        if family not in runs:
            root, base = family_dirs(family), prepared(family)[0]
            tmp = tmp_path_factory.mktemp(f"{family}-dpo-lora")
            dialogues = [json.loads(line)["messages"] for line in (root / "data" / "chatterbot.jsonl").open()]
            made = preference.from_dialogues({"all": [d for d in dialogues if len(d[-1]["content"].split()) >= 4]})
            for name, part in (("train", made[16:136]), ("eval", made[:16])):
                (tmp / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))
            config = write_config(tmp / "run.yaml", root, tmp / "out",
                                  data={"train_files": [str(tmp / "train.jsonl")],
                                        "eval_files": [str(tmp / "eval.jsonl")]},
                                  training={"objective": "dpo", "max_steps": 4, "log_every": 1, "save_every": 4,
                                            "eval_every": 4, "lr": 5e-3},
                                  model={"name_or_path": str(base)}, lora={"enabled": True, "rank": 4},
                                  output={"save_dtype": "fp32"})
            launch_family(family, config)
            runs[family] = base, tmp / "out"
        return runs[family]

    return run


# Resuming is the same code for every dense family (StarCoder2 stands for them; Llama's and Qwen2's differences,
# rotary layouts, sliding windows on some layers, a tied output projection, are what packing and consolidation
# see, which the other tests cover). A mixture of experts adds routing and the load-balancing loss to what must
# come back exactly.
@pytest.mark.parametrize("family", ["starcoder2", "qwen3_moe"])
def test_a_resumed_run_ends_bit_identical(family_run, family, tmp_path):
    root, ref = family_run(family)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / f"step_{SAVE_EVERY:08d}", resumed / "checkpoints" / f"step_{SAVE_EVERY:08d}")
    launch_family(family, run_config(root, resumed), "--resume_from_checkpoint", "latest")
    assert f"at step {SAVE_EVERY}" in (resumed / "train.log").read_text()
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), family
    later = range(SAVE_EVERY + 1, STEPS + 1)
    for name in ("train/loss", "train/aux_loss") if family in MOE else ("train/loss",):
        ref_loss, run_loss = dict(scalars(ref)[name]), dict(scalars(resumed)[name])
        assert [run_loss[s] for s in later] == [ref_loss[s] for s in later], name
    evals = dict(scalars(ref)["eval/loss"])
    assert evals[STEPS] < evals[0], evals  # it learned


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoints_consolidate_to_exactly_deepspeeds_weights(family_run, family, tmp_path):
    _, ref = family_run(family)
    ckpt = checkpoints.find("latest", ref / "checkpoints")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    aliases = export.from_checkpoint(ckpt, tmp_path / "m", dtype="fp32").aliases
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    assert tied == (family in ("qwen2", "qwen3")) and bool(aliases) == tied and ("lm_head.weight" in reference)
    saved = model.state_dict()
    for name, value in reference.items():
        assert torch.equal(saved[name], value), name
    same_storage = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert same_storage == tied


@pytest.mark.parametrize("family", FAMILIES)
def test_the_saved_model_chats_with_its_template_and_stops_at_the_end_token(family_run, family):
    root, ref = family_run(family)
    tokenizer = AutoTokenizer.from_pretrained(ref / "final")
    model = AutoModelForCausalLM.from_pretrained(ref / "final")
    original = AutoTokenizer.from_pretrained(root / "model")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if "<|end|>" not in original.get_vocab():  # added by the run: the embedding grew to hold it
        assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer) > len(original)
    assert model.generation_config.eos_token_id == end and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"][0].tolist()
    bos = [original.bos_token_id] if family == "llama" else []  # Llama's tokenizer adds a BOS: exactly one
    assert ids[: len(bos)] == bos and ids.count(original.bos_token_id) == len(bos)
    # A few training steps do not teach a tiny model when to end (GPTBigCode's longer run shows that it
    # learns to: tests/inference/test_sampling.py), so the end token is made likely once 3 tokens are out: what is
    # checked is that generation, configured by the saved files alone, stops there.
    new = model.generate(**prompt, max_new_tokens=40, min_new_tokens=3, do_sample=False,
                         sequence_bias={(end,): 50.0})[0, len(ids):].tolist()
    assert new[-1] == end and len(new) == 4, tokenizer.decode(new)
    assert "<|" not in tokenizer.decode(new, skip_special_tokens=True)
    card = (ref / "final" / "README.md").read_text()
    assert json.loads((ref / "final" / "config.json").read_text())["model_type"] == family and "Hello" not in card


@pytest.mark.parametrize("family", MOE)
def test_a_mixture_of_experts_trains_with_its_balancing_loss_and_saves_in_the_published_layout(family_run, family):
    """The released configs' output_router_logits: true trains (the balancing loss logged apart) and is saved
    as it was; the experts are written one matrix per expert, as the published checkpoints hold them, and the
    folder loads in plain transformers to the weights the run's checkpoint consolidates to."""
    root, ref = family_run(family)
    log, logged = (ref / "train.log").read_text(), scalars(ref)
    assert "router load-balancing loss on, coefficient 0.001 (the model config's router_aux_loss_coef)" in log
    assert [s for s, _ in logged["train/aux_loss"]] == list(range(1, STEPS + 1)) and " train/aux_loss=" in log
    assert "router/layer_1/entropy" in logged and "router/layer_0/expert_7" in logged
    config = json.loads((ref / "final" / "config.json").read_text())
    assert config["output_router_logits"] is True
    names = load_file(ref / "final" / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in names and not any("gate_up_proj" in n for n in names)
    model = AutoModelForCausalLM.from_pretrained(ref / "final", dtype=torch.float32)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints.find("latest", ref / "checkpoints")))
    own = model.state_dict()
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert torch.equal(own[name], consolidated[name].to(torch.bfloat16).float()), name  # saved in bf16
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.isfinite(model(ids, labels=ids).loss)  # transformers' own balancing loss, on an unpadded row


@pytest.mark.parametrize("family", MOE)
def test_ranks_routing_to_disjoint_experts_finish_every_step(family_run, adapter_run, family):
    """Rank 0's tokens only reach the first half of the experts, rank 1's the second: transformers 5 keeps
    each layer's experts in one packed tensor, which ZeRO-3 gathers whole whichever experts a rank's tokens
    chose, so no rank waits for a gather the other never starts; full fine-tuning (each block a ZeRO-3 leaf)
    and LoRA (none) alike."""
    runs = [("full", family_run(family)[1])] + ([("lora", adapter_run(family)[1])] if family == "qwen3_moe" else [])
    for kind, out in runs:
        record = out.parent / f"{out.name}.routing" if kind == "full" else out.parent / "run.routing"
        ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0] and ranks[1] and max(ranks[0]) < 4 <= min(ranks[1]), (kind, ranks)
        steps = STEPS if kind == "full" else 4
        assert [s for s, _ in scalars(out)["train/loss"]] == list(range(1, steps + 1)), kind


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_a_dpo_lora_adapter_loads_and_merges_in_plain_transformers(adapter_run, family, tmp_path):
    from peft import PeftModel

    base_dir, out = adapter_run(family)
    logged = scalars(out)
    assert [s for s, _ in logged["train/rewards/accuracies"]] == [1, 2, 3, 4]
    assert ("train/aux_loss" in logged) == (family == "qwen3_moe")
    card = (out / "adapter" / "README.md").read_text()
    major = transformers.__version__.split(".")[0]
    assert f"Trained with transformers {transformers.__version__}: load it with transformers {major}.x" in card
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    saved = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).state_dict()
    for name, value in merged.state_dict().items():
        assert torch.allclose(saved[name], value, atol=1e-6), name
    adapted = [n for n in load_file(out / "adapter" / "adapter_model.safetensors") if "lora_A" in n]
    assert adapted and all(".self_attn." in n for n in adapted) == (family == "qwen3_moe")
