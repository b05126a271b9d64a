"""LoRA and QLoRA through peft, in the same loop: under real 2-process ZeRO-3 and FSDP2 the adapters train and the
base does not, resume is bit-identical, checkpoints are small and export the adapter and the merged model, and the
outputs load in peft and in plain transformers."""

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loop.model import architecture, estimate, flops, lora
from loop.state import checkpoints, integrity
from tests.conftest import ROOT, launch, run_card_snippets, run_in_process, scalars, write_config

STEPS = 8


def lora_config(tmp_path, tiny_dir, out, model=None, **lora_settings):
    return write_config(tmp_path / f"{out.name}.yaml", tiny_dir, out,
                        training={"max_steps": STEPS, "save_every": STEPS // 2, "keep_last": 5, "log_every": 1,
                                  "eval_every": STEPS // 2, "lr": 1e-2},
                        lora={"enabled": True, "rank": 8, **lora_settings},
                        **({"model": {"name_or_path": str(model)}} if model else {}))


def run_and_resume(tmp, tiny_dir, engine: str, model=None):
    """A LoRA run under 2-process `engine`, and a second one resumed from its middle checkpoint."""
    launch(lora_config(tmp, tiny_dir, tmp / "ref", model), accelerate_config=f"cpu_{engine}.yaml")
    middle = f"step_{STEPS // 2:08d}"
    (tmp / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp / "ref" / "checkpoints" / middle, tmp / "resumed" / "checkpoints" / middle)
    launch(lora_config(tmp, tiny_dir, tmp / "resumed", model), "--resume_from_checkpoint", "latest",
           accelerate_config=f"cpu_{engine}.yaml")
    return tmp / "ref", tmp / "resumed"


@pytest.fixture(scope="module")
def lora_runs(tiny_dir, tmp_path_factory):
    """A LoRA run under 2-process ZeRO-3, and a second one resumed from its middle checkpoint."""
    return run_and_resume(tmp_path_factory.mktemp("lora"), tiny_dir, "zero3")


@pytest.fixture(scope="module")
def fsdp2_lora_runs(tiny_dir, prepared, tmp_path_factory):
    """`lora_runs` under 2-process FSDP2 (two launches, about 20 s), from the model with the template's tokens
    already in it: FSDP2 refuses LoRA's trainable new-token rows (fsdp2.place_model)."""
    return run_and_resume(tmp_path_factory.mktemp("fsdp2-lora"), tiny_dir, "fsdp2", prepared("gpt_bigcode")[0])


def runs_of(request, engine: str):
    """The engine's pair of runs, each a module fixture (named here, where tests/tiers.py sees that they launch)."""
    return request.getfixturevalue({"zero3": "lora_runs", "fsdp2": "fsdp2_lora_runs"}[engine])


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_only_the_adapters_train_and_the_loss_falls(request, engine):
    ref, _ = runs_of(request, engine)
    log = (ref / "train.log").read_text()
    total, trained = (int(x.replace(",", "")) for x in
                      log.split("model: ")[1].split(" trainable")[0].split(" parameters, "))
    assert 0 < trained < total / 10  # the optimizer holds only these (loop/training/optim.py skips frozen weights)
    logged = scalars(ref)
    assert logged["model/trainable_parameters"][0][1] == trained and logged["model/parameters"][0][1] == total
    evals = dict(logged["eval/loss"])
    assert evals[STEPS] < evals[0] - 0.05, evals
    # The run compares the frozen base it trained with the base it merges into; a change would have failed it.
    assert "saved the adapter" in log and (ref / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_resume_is_bit_identical_and_checkpoints_are_small(request, engine, trained_run):
    ref, resumed = runs_of(request, engine)
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (ref, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    uninterrupted, continued = (dict(scalars(d)["train/loss"]) for d in (ref, resumed))
    assert [s for s in continued if s > STEPS // 2] == list(range(STEPS // 2 + 1, STEPS + 1)), continued
    assert all(continued[s] == uninterrupted[s] for s in continued if s > STEPS // 2), (continued, uninterrupted)
    ckpt = checkpoints.find("latest", ref / "checkpoints")
    full = checkpoints.find("latest", trained_run / "checkpoints")  # the same tiny model, every weight trained
    # Both engines about 1/8; FSDP2 once held the frozen tied output projection too (1/3).
    assert integrity.size(ckpt) < integrity.size(full) / 4, (integrity.size(ckpt), integrity.size(full))
    assert (ckpt / lora.ADAPTER_CONFIG).is_file()


def test_the_adapter_loads_in_peft_and_the_merged_model_in_transformers(lora_runs, tiny_dir):
    ref, _ = lora_runs
    tokenizer = AutoTokenizer.from_pretrained(ref / "adapter")
    assert "<|assistant|>" in tokenizer.chat_template["default"]
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    with lora.quiet_peft():  # transformers 5 deprecates a name peft reads: not this project's warning to test
        with_adapter = PeftModel.from_pretrained(base, ref / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(ref / "final").eval()
    assert merged.dtype == torch.bfloat16 and not hasattr(merged, "peft_config")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        expected, got = with_adapter(ids).logits, merged(ids).logits.float()
        untrained = base.get_base_model()(ids).logits if hasattr(base, "get_base_model") else None
    assert (got - expected).abs().max().item() < 0.1  # bf16 weights
    assert untrained is None or (expected - untrained).abs().max().item() > 0.1
    card = (ref / "final" / "README.md").read_text()
    assert "with a LoRA adapter merged into its weights" in card and "rank 8" in card
    assert "A LoRA adapter for" in (ref / "adapter" / "README.md").read_text()
    assert "library_name: peft" in (ref / "adapter" / "README.md").read_text()
    assert int(run_card_snippets(ref / "adapter").split("new tokens:")[1]) >= 1  # base + adapter load and answer


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_a_lora_checkpoint_exports_the_adapter_and_the_merged_model(request, engine, tmp_path):
    """From ZeRO-3's shards or FSDP2's DCP folder: the adapter, and the base it names with the adapter merged in."""
    ref, _ = runs_of(request, engine)
    ckpt = checkpoints.find("latest", ref / "checkpoints")
    for extra, folder, check in (([], "adapter", "adapter_model.safetensors"), (["--merged"], "final",
                                                                               "model.safetensors")):
        proc = subprocess.run([sys.executable, "tools/consolidate_checkpoint.py", str(ckpt), str(tmp_path / folder),
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for noise in ("Warning", "gemm_4bit_forward", "renamed"):  # peft's and bitsandbytes' words, not ours
            assert noise not in proc.stderr, proc.stderr[-2000:]
        ours, theirs = load_file(tmp_path / folder / check), load_file(ref / folder / check)
        assert ours.keys() == theirs.keys()
        assert all((ours[k].float() - theirs[k].float()).abs().max() < 1e-2 for k in ours)
    # The adapter names the run's base, not the checkpoint it came from: peft finds its base by that name.
    named = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == json.loads((ref / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    from peft import AutoPeftModelForCausalLM

    with lora.quiet_peft():
        assert AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").peft_config["default"].r == 8


def test_qlora_trains_a_4bit_base_on_cpu_alone_and_under_zero3(tiny_dir, tmp_path):
    cfg = lora_config(tmp_path, tiny_dir, tmp_path / "one", quantize="4bit")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert run_in_process(cfg, "--max_steps", "4") == 0  # one process, no DeepSpeed
    assert not [w for w in said if "is_gradient_checkpointing" in str(w.message)]  # peft's use of an old name
    launch(lora_config(tmp_path, tiny_dir, tmp_path / "zero3", quantize="4bit"), "--max_steps", "4")
    for out in (tmp_path / "one", tmp_path / "zero3"):
        evals = dict(scalars(out)["eval/loss"])
        assert evals[4] < evals[0], evals
        assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "final" / "config.json").is_file()
        assert "QLoRA" in (out / "final" / "README.md").read_text()


def test_flops_and_memory_count_a_frozen_base(tiny_dir):

    shape = architecture.Shape(hidden=8, layers=1, q_heads=1, kv_heads=1, head_dim=8, vocab=10, max_positions=8,
                         windows=(None,))
    full, frozen = (flops.training_flops(1000, shape, [4], trainable) for trainable in (None, 10))
    assert full - frozen == 2 * (1000 - 10) * 4  # no weight gradients for the frozen 990
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    from loop.config import LoraSettings

    wrapped = lora.wrap(model, LoraSettings(enabled=True, rank=4), added_tokens=[])
    trainable, _ = flops.counts(wrapped)
    assert estimate.lora_parameters(model.config, 4) == trainable
    head, row = estimate.estimate(str(tiny_dir / "model"), 1, 1, 2, 128, False, lora_rank=4, qlora=True)
    assert row["setting"].startswith("QLoRA") and head["adapter"] == trainable


def test_a_changed_frozen_base_is_caught(tiny_dir):
    from loop.config import LoraSettings

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    wrapped = lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_dir / "model"), LoraSettings(enabled=True), [])
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    assert lora.base_changes(state, base) == []
    key = next(k for k in state if "c_attn.base_layer.weight" in k)
    state[key][0, 0] += 1e-3
    assert lora.base_changes(state, base) == [key.removeprefix("base_model.model.").replace(".base_layer.", ".")]


def test_a_lora_checkpoint_answers_as_its_merged_model(lora_runs, tmp_path):
    """tools/generate.py takes a checkpoint folder: a LoRA one is its base with the adapter merged in (read as a
    plain ZeRO checkpoint, its adapter-only weights would match nothing and a random model would answer)."""
    from loop.inference.load import load_for_generation

    ref, _ = lora_runs
    ckpt = checkpoints.find("latest", ref / "checkpoints")
    from_ckpt, tokenizer = load_for_generation(ckpt)
    exported = tmp_path / "merged"
    subprocess.run([sys.executable, "tools/consolidate_checkpoint.py", str(ckpt), str(exported), "--merged",
                    "--dtype", "fp32"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    merged, _ = load_for_generation(exported)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert (from_ckpt(ids).logits - merged(ids).logits).abs().max().item() < 1e-4


def test_fsdp2_refuses_lora_on_new_token_rows_of_a_tied_embedding_in_one_line(tiny_dir, prepared):
    """peft's trainable-token rows share the tied embedding FSDP2 would shard twice: refused before prepare (a
    ConfigError: one line, exit 2), and a model that already has the template's tokens passes."""
    from loop.config import ConfigError, LoraSettings
    from loop.engine import fsdp2

    for folder, added, refused in ((tiny_dir / "model", [1, 2], True), (prepared("gpt_bigcode")[0], [], False)):
        model = lora.wrap(AutoModelForCausalLM.from_pretrained(folder), LoraSettings(enabled=True), added)
        if refused:
            with pytest.raises(ConfigError, match="^lora: the chat template adds tokens .* under FSDP2 yet; train "
                                                  "with DeepSpeed"):
                fsdp2.place_model(None, model, True)
        else:
            fsdp2.place_model(None, model, True)
