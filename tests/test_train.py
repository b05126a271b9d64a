"""End to end: 2-process DeepSpeed ZeRO-3 on CPU over gloo, the way the quickstart runs."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from deepspeed.utils.config import get_timers_config
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from loop import config
from loop.engine import deepspeed
from tests.conftest import ROOT, free_port, scalars, write_config


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run, None


def test_loss_falls_and_tensorboard_holds_the_scalars(run):
    out, _ = run
    logged = scalars(out)
    for tag in ("train/loss", "eval/loss", "eval/perplexity", "train/lr", "train/grad_norm",
                "throughput/tokens_per_s", "throughput/trained_tokens_per_s", "time/forward_backward",
                "time/optimizer", "time/data", "memory/peak_bytes", "train/epoch", "throughput/mfu",
                "throughput/packing_efficiency", "throughput/tokens_per_s_per_device", "data/dialogues"):
        assert tag in logged, f"{tag} missing from TensorBoard; have {sorted(logged)}"
    evals = dict(logged["eval/loss"])
    assert sorted(evals) == [0, 8, 16]
    assert evals[16] < evals[0] - 0.5, evals
    losses = [v for _, v in logged["train/loss"]]
    assert losses[-1] < losses[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["seed"] == 7  # resolved + override
    assert (out / "train.log").read_text().count("eval loss") == 3
    assert "**What is Python?**" in (out / "samples.md").read_text()
    assert 0 < logged["throughput/mfu"][-1][1] < 1
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("samples/text_summary")
    assert [e.step for e in texts] == [8, 16]  # every 8 steps and at the end, on 2 ZeRO-3 processes
    assert b"What is Python?" in texts[-1].tensor_proto.string_val[0]


def test_saved_model_reloads_with_the_weights_the_run_ended_with(run):
    out, _ = run
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.dtype == torch.bfloat16
    # Independent reference: DeepSpeed's own consolidation of the last checkpoint's fp32 master weights.
    master = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / "step_00000016"))
    saved = model.state_dict()
    for name, fp32 in master.items():
        assert torch.equal(saved[name], fp32.to(torch.bfloat16)), name
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied


def test_saved_model_chats_with_its_template(run):
    out, _ = run
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert model.generation_config.eos_token_id == end
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|user|>\nHello<|end|>\n<|assistant|>\n")
    new = model.generate(**prompt, max_new_tokens=12, min_new_tokens=4, do_sample=False)
    new = new[0, prompt["input_ids"].shape[1]:].tolist()
    assert tokenizer.decode(new, skip_special_tokens=True).strip()
    assert end not in new[:-1]  # generation stops at the end token: nothing follows it


def test_processes_that_accelerate_leaves_unconnected_are_refused(tiny_dir, tmp_path):
    """`accelerate launch --multi_gpu` on a machine without GPUs starts the processes but sets up no
    distributed training: each would train on its own and overwrite the others' checkpoints."""
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out", training={"max_steps": 2})
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), "loop/train.py", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and "2 processes were launched but accelerate set up no distributed training" in errors[0]
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_deepspeed_settings_the_loop_fills_in():
    """The batch comes from the run config; DeepSpeed's throughput timer (a device synchronisation at every
    forward and step) is off and one process keeps every weight resident and uses torch's linear, unless
    DeepSpeed's config says."""
    t = config.TrainingConfig(micro_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.5)
    one = {"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}
    deepspeed.settings(one, t, 1)
    assert get_timers_config(one).enabled is False  # read the way DeepSpeed reads it
    assert one["zero_optimization"]["stage3_param_persistence_threshold"] == 2**62
    assert one["zero_optimization"]["memory_efficient_linear"] is False  # nothing is released to re-gather
    assert (one["train_batch_size"], one["gradient_clipping"]) == (6, 0.5)
    many = {"zero_optimization": {"stage": 3}}
    deepspeed.settings(many, t, 8)
    assert "stage3_param_persistence_threshold" not in many["zero_optimization"] and many["train_batch_size"] == 48
    assert "memory_efficient_linear" not in many["zero_optimization"]
    chosen = {"timers": {"throughput": {"enabled": True, "synchronized": False}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100_000}}
    deepspeed.settings(chosen, t, 1)
    assert get_timers_config(chosen).enabled and not get_timers_config(chosen).synchronized
    assert chosen["zero_optimization"]["stage3_param_persistence_threshold"] == 100_000
    assert "memory_efficient_linear" not in chosen["zero_optimization"]  # some weights are released


PROBE = """
import sys, torch
from transformers import AutoModelForCausalLM
from loop import config
from loop.engine.accelerator import make_accelerator
accelerator = make_accelerator(config.from_file(sys.argv[1]))
AutoModelForCausalLM.from_pretrained(sys.argv[2])  # under zero.Init, as load_model does
sys.stdout.write(f"linear: {torch.nn.functional.linear.__module__.split('.')[0]}\\n")  # one write: 2 ranks share stdout
"""


@pytest.mark.parametrize("processes", [1, 2])
def test_one_zero3_process_loads_the_model_with_torchs_linear(tiny_dir, tmp_path, processes):
    """DeepSpeed's memory-efficient linear re-gathers a released weight in backward; one process releases
    none, so its model is built with torch's (which is faster), while several processes keep DeepSpeed's.
    The setting must reach the config copy that transformers' zero.Init reads."""
    (tmp_path / "probe.py").write_text(PROBE)
    cfg = write_config(tmp_path / "run.yaml", tiny_dir, tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "accelerate_configs/cpu_zero3.yaml", "--num_processes", str(processes),
                           "--main_process_port", str(free_port()), str(tmp_path / "probe.py"), str(cfg),
                           str(tiny_dir / "model")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    linear = {line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("linear:")}
    assert linear == ({"torch"} if processes == 1 else {"deepspeed"}), proc.stdout


def test_main_tells_the_story_in_order_in_at_most_120_lines_and_the_loop_body_in_25():
    """loop/train.py's main() reads config, data, model, prepare, resume, loop, final model; the loop body is
    step -> bookkeeping -> the state handed to each component, which decides itself when it acts."""
    import ast
    import re

    source = (ROOT / "loop" / "train.py").read_text()
    main = next(f for f in ast.parse(source).body if isinstance(f, ast.FunctionDef) and f.name == "main")
    loop = next(node for node in ast.walk(main) if isinstance(node, ast.While))
    assert main.end_lineno - main.lineno + 1 <= 120
    assert loop.end_lineno - loop.body[0].lineno + 1 <= 25
    text = ast.get_source_segment(source, main)
    sections = re.findall(r"# (\d)\. (\w+)", text)
    assert sections == [("1", "Config"), ("2", "Tokenizer"), ("3", "Model"), ("4", "Prepare"), ("5", "Resume"),
                        ("6", "The"), ("7", "Final")], sections
    body = ast.get_source_segment(source, loop)
    for component in ("logger.maybe_log(state", "evaluator.maybe_evaluate(state", "sampler.maybe_sample(state",
                      "saver.maybe_save(state", "code_eval(model, state.step"):
        assert component in body, component
    assert "every" not in body and "on_schedule" not in source  # no schedule is decided in the loop
