"""A preference run end to end under real 2-process ZeRO-3 (under FSDP2 too: every weight, and LoRA): TRL's metrics in
TensorBoard and train.log, the reference pass timed and cached, a model card that says what was done, and
everything SFT has (bit-identical resume after kill -9 and after preemption, even with the reference cache gone;
the config guard; consolidation and export)."""

import json
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from loop import config
from loop.data import preference
from loop.state import checkpoints, export, resuming
from loop.state.progress import LoopState
from tests.conftest import launch, run_in_process, scalars, write_config
from tests.state.test_checkpoints import start, wait_for, workers

STEPS, SAVE_EVERY, EVAL_EVERY = 40, 4, 20  # about 9 steps an epoch
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def dpo_config(folder, tiny_dir, data, out):
    train, held = data
    return write_config(folder / f"{out.name}.yaml", tiny_dir, out,
                        data={"train_files": [str(train)], "eval_files": [str(held)], "seq_len": 256,
                              "cache_dir": str(data[0].parent / "cache")},
                        training={"objective": "dpo", "max_steps": STEPS, "save_every": SAVE_EVERY, "log_every": 1,
                                  "eval_every": EVAL_EVERY, "keep_last": 20, "lr": 5e-4, "warmup_steps": 1},
                        dpo={"beta": 0.2}, output={"save_dtype": "fp32"})


@pytest.fixture(scope="module")
def pair_files(corpus, tmp_path_factory):
    """Pairs with a preference a tiny random model can learn and carry over to held-out prompts: each answer
    against its own words in reverse order."""
    folder = tmp_path_factory.mktemp("dpo-data")
    made = preference.from_dialogues({"all": [d for d in corpus if len(d[-1]["content"].split()) >= 4]})[:200]
    for name, part in (("train", made[16:]), ("eval", made[:16])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))
    return folder / "train.jsonl", folder / "eval.jsonl"


@pytest.fixture(scope="module")
def dpo_run(tiny_dir, pair_files, tmp_path_factory):
    """The uninterrupted run (checkpoints every 4 steps, eval at 0, 20 and 40)."""
    tmp = tmp_path_factory.mktemp("dpo-run")
    launch(dpo_config(tmp, tiny_dir, pair_files, tmp / "ref"))
    return tmp / "ref"


def test_trls_metrics_reach_tensorboard_and_train_log_and_held_out_accuracy_rises(dpo_run, pair_files):
    logged, log = scalars(dpo_run), (dpo_run / "train.log").read_text()
    for name in METRICS:
        assert [s for s, _ in logged[f"train/{name}"]] == list(range(1, STEPS + 1)), name
        assert [s for s, _ in logged[f"eval/{name}"]] == [0, EVAL_EVERY, STEPS], name
        assert f" train/{name}=" in log, name
    assert "eval/perplexity" not in logged and logged["data/pairs"][0][1] > 100
    accuracy = dict(logged["eval/rewards/accuracies"])
    assert accuracy[0] == 0.0 and dict(logged["eval/loss"])[0] == pytest.approx(0.693147, abs=1e-6)
    assert accuracy[STEPS] >= 0.6 and dict(logged["eval/rewards/margins"])[STEPS] > 0
    assert f"step {STEPS}: eval loss" in log and f"reward accuracy {accuracy[STEPS]:.1%}" in log
    passed = log.split("reference log-probs of ")[1].splitlines()[0]
    assert passed.startswith(f"{int(logged['data/pairs'][0][1]) - 16} train and 16 eval pairs: computed in ")
    assert "cached in " in passed and list((pair_files[0].parent / "cache").glob("reference-*.safetensors"))


def test_every_eval_metric_reaches_train_log_at_every_evaluation(dpo_run):
    """What the README promises (issue 40.3): the eval loss, reward accuracy, margins, chosen and rejected
    rewards and log-probabilities in train.log, one line an evaluation, as TensorBoard has them."""
    logged, log = scalars(dpo_run), (dpo_run / "train.log").read_text().splitlines()
    for step in (0, EVAL_EVERY, STEPS):
        (line,) = [line for line in log if f" INFO step {step}: eval/loss=" in line]
        values = dict(pair.split("=") for pair in line.split(f"step {step}: ")[1].split())
        for name in METRICS:
            assert float(values[f"eval/{name}"]) == pytest.approx(dict(logged[f"eval/{name}"])[step], rel=1e-3,
                                                                  abs=1e-7), (step, name)


def test_the_model_card_says_dpo_beta_loss_reference_and_final_accuracy(dpo_run):
    card = ModelCard.load(dpo_run / "final" / "README.md")
    accuracy = dict(scalars(dpo_run)["eval/rewards/accuracies"])[STEPS]
    assert "dpo" in card.data.tags and "preference-tuned with DPO" in card.text
    for row in ("| objective | DPO (direct preference optimization) |", "| DPO beta | 0.2 |", "| DPO loss | sigmoid |",
                "| reference | the starting model's log-probabilities, computed once before training |"):
        assert row in card.text, row
    assert f"final eval reward accuracy (chosen preferred to rejected): {accuracy:.1%}" in card.text


def test_a_dpo_checkpoint_consolidates_to_the_final_model(dpo_run, tmp_path):
    export.from_checkpoint(checkpoints.find("latest", dpo_run / "checkpoints"), tmp_path / "m", dtype="fp32")
    final, consolidated = load_file(dpo_run / "final" / "model.safetensors"), load_file(tmp_path / "m" /
                                                                                         "model.safetensors")
    # The run trains bf16 weights over float32 master weights: the final model holds the bf16 ones.
    assert consolidated and all(torch.equal(final[k], v.bfloat16().float()) for k, v in consolidated.items())


def test_what_a_preference_step_is_is_guarded_on_resume(dpo_run):
    ckpt = checkpoints.find("latest", dpo_run / "checkpoints")
    saved = yaml.safe_load((ckpt / "run_config.yaml").read_text())
    state = LoopState(**json.loads((ckpt / checkpoints.STATE_FILE).read_text()))
    cfg = config.from_dict(saved)
    assert resuming.compare(cfg, saved, state, state.data_fingerprint) == []
    for key, value in (("training.objective", "sft"), ("dpo.beta", 0.1), ("dpo.loss", "ipo"),
                       ("dpo.label_smoothing", 0.1), ("dpo.max_prompt_length", 32)):
        section, name = key.split(".")
        changed = {**saved, section: {**saved[section], name: value}}
        with pytest.raises(config.ConfigError, match=f"{key}: "):
            resuming.compare(config.from_dict(changed), saved, state, state.data_fingerprint)
    lora = {**saved, "lora": {**saved["lora"], "enabled": True}, "dpo": {**saved["dpo"], "reference": "live"}}
    with pytest.raises(config.ConfigError, match="dpo.reference: 'precomputed' -> 'live'"):
        resuming.compare(config.from_dict(lora), saved, state, state.data_fingerprint)


def test_kill_9_then_preemption_then_resume_is_bit_identical_even_without_the_reference_cache(
        tiny_dir, pair_files, dpo_run, tmp_path):
    """Killed after its first checkpoint; resumed (the reference read from the cache) and preempted with
    SIGTERM (exit 75, a checkpoint); the cache deleted; resumed again: the reference is computed again from
    the starting model, before the checkpoint is restored, and the run ends as the uninterrupted one did."""
    out = tmp_path / "run"
    cfg = dpo_config(tmp_path, tiny_dir, pair_files, out)
    proc = start(cfg)
    wait_for(out / "checkpoints" / f"step_{SAVE_EVERY:08d}" / checkpoints.MARKER, proc=proc)
    for p in [proc, *workers(proc)]:
        p.kill()
    proc.wait()

    proc = start(cfg, "--resume_from_checkpoint", "latest")
    log = out / "train.log"
    wait_for(log, proc=proc)
    while "train/loss=" not in log.read_text().partition("resumed from")[2]:  # a resumed step is done
        assert proc.poll() is None and time.sleep(0.05) is None
    for w in workers(proc):
        w.send_signal(signal.SIGTERM)
    said, _ = proc.communicate(timeout=300)
    assert "exitcode  : 75" in said, said[-3000:]
    text = log.read_text()
    runs = text.split(" INFO data: ")[1:]  # what each launch logged, from its data line on
    assert "reference log-probs" in runs[-1] and "read from" in runs[-1].split("reference log-probs")[1]
    preempted_at = int(text.split("preempted (")[1].split(" at step ")[1].split(";")[0])
    assert SAVE_EVERY < preempted_at < STEPS

    for cached in (pair_files[0].parent / "cache").glob("reference-*"):
        cached.unlink()
    launch(cfg, "--resume_from_checkpoint", "latest")
    last = log.read_text()[len(text):]  # what the last launch logged (resume is said before its data line)
    assert "computed in" in last.split("reference log-probs")[1]
    assert f"resumed from {out / 'checkpoints' / f'step_{preempted_at:08d}'}" in last
    ref_w, run_w = (load_file(d / "final" / "model.safetensors") for d in (dpo_run, out))
    assert ref_w.keys() == run_w.keys() and all(torch.equal(ref_w[k], run_w[k]) for k in ref_w)
    ref, run = scalars(dpo_run), scalars(out)
    for name in METRICS:
        assert dict(run[f"train/{name}"])[STEPS] == dict(ref[f"train/{name}"])[STEPS], name
    assert dict(run["eval/rewards/accuracies"])[STEPS] == dict(ref["eval/rewards/accuracies"])[STEPS]


def test_full_parameter_dpo_under_fsdp2_starts_from_zero3s_reference_and_exports(tiny_dir, pair_files, dpo_run,
                                                                                  tmp_path):
    """Every weight trained under 2-process FSDP2 (one launch of 8 steps, about 10 s): its own reference pass, by
    the sharded model before the first step, gives ZeRO-3's log-probabilities on the same rows (the cache of
    `dpo_run`, the same key; measured equal to the bit); the policy starts as the reference (eval loss and train
    step 1's loss ln 2, step 1's metrics ZeRO-3's), learns, and its DCP checkpoint consolidates to the final model."""
    out, cache = tmp_path / "fsdp2", tmp_path / "cache"
    launch(dpo_config(tmp_path, tiny_dir, pair_files, out), "--max_steps", "8", "--eval_every", "8", "--cache_dir",
           str(cache), accelerate_config="cpu_fsdp2.yaml")
    log = (out / "train.log").read_text()
    assert "computed in" in log.split("reference log-probs of ")[1].splitlines()[0]
    assert "| distributed setup | FSDP2 (fully_shard), 2 process(es)" in (out / "final" / "README.md").read_text()
    (ours,) = cache.glob("reference-*.safetensors")
    theirs = load_file(pair_files[0].parent / "cache" / ours.name)  # ZeRO-3's, under the same key
    for name, values in load_file(ours).items():
        torch.testing.assert_close(values, theirs[name], rtol=1e-5, atol=1e-5, msg=name)
    run, zero3 = scalars(out), scalars(dpo_run)
    evals, accuracy = dict(run["eval/loss"]), dict(run["eval/rewards/accuracies"])
    assert evals[0] == pytest.approx(0.693147, abs=1e-6) and accuracy[0] == 0.0
    assert evals[8] < evals[0] and dict(run["eval/rewards/margins"])[8] > 0
    for name in METRICS:  # step 1 is before any update: the same rows as ZeRO-3's give the same values
        assert [s for s, _ in run[f"train/{name}"]] == list(range(1, 9)), name
        assert dict(run[f"train/{name}"])[1] == pytest.approx(dict(zero3[f"train/{name}"])[1], rel=1e-5,
                                                               abs=1e-6), name
    assert dict(run["train/loss"])[1] == pytest.approx(0.693147, abs=1e-6)
    export.from_checkpoint(checkpoints.find("latest", out / "checkpoints"), tmp_path / "m", dtype="fp32")
    final, consolidated = (load_file(d / "model.safetensors") for d in (out / "final", tmp_path / "m"))
    assert final.keys() - consolidated.keys() == {"lm_head.weight"}  # tied: written once (transformers reads both)
    assert all(torch.equal(final[k], v) for k, v in consolidated.items())  # FSDP2 keeps float32 weights: exact


def test_with_lora_the_reference_is_the_base_with_its_adapter_off_precomputed_or_live(tiny_dir, pair_files,
                                                                                        prepared, tmp_path):
    """Under 2-process ZeRO-3: computed once with the adapter switched off, or switched off at every step
    (no cache, no second model): the same reference, so the same steps; the adapter is what trains. Under
    2-process FSDP2 (one more short launch, precomputed), from the model with the template's tokens already in
    it (FSDP2 refuses LoRA's trainable new-token rows): the reference pass, the LoRA steps and the adapter."""
    runs = {}
    fsdp2_model = str(prepared("gpt_bigcode")[0])
    for engine, reference in (("zero3", "precomputed"), ("zero3", "live"), ("fsdp2", "precomputed")):
        name = reference if engine == "zero3" else engine
        cfg = dpo_config(tmp_path, tiny_dir, pair_files, tmp_path / name)
        model = ("--name_or_path", fsdp2_model) if engine == "fsdp2" else ()
        launch(cfg, "--max_steps", "6", "--eval_every", "6", "--lora.enabled", "true", "--lora.rank", "8",
               "--lr", "1e-2", "--reference", reference, "--cache_dir", str(tmp_path / f"cache-{name}"), *model,
               mixed_precision="no", accelerate_config=f"cpu_{engine}.yaml")  # float32: zero3's compared below
        runs[name] = scalars(tmp_path / name)
    for name in ("precomputed", "fsdp2"):
        assert "computed in" in (tmp_path / name / "train.log").read_text().split("with its adapter off")[0]
    assert "reference log-probs" not in (tmp_path / "live" / "train.log").read_text()
    assert not list((tmp_path / "cache-live").glob("reference-*"))
    for name in METRICS:
        for (step, a), (_, b) in zip(runs["precomputed"][f"train/{name}"], runs["live"][f"train/{name}"], strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), (name, step)
    for run in runs.values():
        evals, accuracy = dict(run["eval/loss"]), dict(run["eval/rewards/accuracies"])
        assert evals[0] == pytest.approx(0.693147, abs=1e-6) and evals[6] < evals[0] and accuracy[6] > 0.5
    for name in ("live", "fsdp2"):
        assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()


def test_qlora_with_the_live_reference_in_one_process(tiny_dir, pair_files, tmp_path):
    cfg = dpo_config(tmp_path, tiny_dir, pair_files, tmp_path / "q")
    assert run_in_process(cfg, "--max_steps", "4", "--eval_every", "4", "--lora.enabled", "true", "--lora.quantize",
                          "4bit", "--lr", "1e-2", "--reference", "live") == 0
    evals = dict(scalars(tmp_path / "q")["eval/loss"])
    assert evals[4] < evals[0] == pytest.approx(0.693147, abs=1e-6)
    card = (tmp_path / "q" / "final" / "README.md").read_text()
    assert "QLoRA" in card and "the base with the LoRA adapter switched off, at every step" in card


def test_the_preference_metrics_reach_wandb_mlflow_and_the_hub(tiny_dir, pair_files, tmp_path, monkeypatch):
    """One process, no DeepSpeed: W&B offline, MLflow's file store, and the Hub mocked (tests/report/test_hub.py)."""
    import re

    from mlflow.tracking import MlflowClient

    from loop.report import hub
    from tests.report.test_hub import FakeHub

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    fake = FakeHub()
    monkeypatch.setattr(hub, "HfApi", fake)
    cfg = dpo_config(tmp_path, tiny_dir, pair_files, tmp_path / "out")
    assert run_in_process(cfg, "--max_steps", "4", "--eval_every", "4", "--log_every", "2", "--report_to",
                          "[tensorboard, wandb, mlflow]", "--push_to_hub", "true", "--hub_model_id", "me/dpo") == 0
    path = next((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.time() + 60  # W&B's service process may still be writing its record when the run returns
    while b"train/loss" not in path.read_bytes() and time.time() < deadline:
        time.sleep(0.5)
    record = path.read_bytes()
    for name in METRICS:
        assert re.search(rf"train/{re.escape(name)}".encode(), record) and f"eval/{name}".encode() in record, name
    client = MlflowClient((tmp_path / "out" / "mlruns").as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    for name in METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"train/{name}")] == [2, 4], name
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"eval/{name}")] == [0, 4], name
    assert run.data.params["dpo.beta"] == "0.2" and run.data.params["training.objective"] == "dpo"
    card = fake.uploaded[("me/dpo", None)]["README.md"].decode()
    assert "| DPO beta | 0.2 |" in card and "final eval reward accuracy" in card


def test_dpo_with_each_pair_split_over_two_processes_steps_as_without(tiny_dir, pair_files, dpo_run, tmp_path):
    """One launch of 8 steps (about 15 s): 2-process ZeRO-3 with every row, so every pair, split over both
    processes (one data-parallel group, twice the accumulation: the same rows a step as `dpo_run`). Its own
    reference pass, each sequence's log-probability added up over the two halves of its row, gives `dpo_run`'s
    (another cache key: it is computed again); step 1, before any update, has `dpo_run`'s loss (ln 2), metrics
    and gradient norm (its rewards are rounding noise about 0, so their accuracy is not compared); eval losses are
    counted per pair once, not per process; and it learns."""
    out, cache = tmp_path / "split", tmp_path / "cache"
    launch(dpo_config(tmp_path, tiny_dir, pair_files, out), "--max_steps", "8", "--eval_every", "8", "--cache_dir",
           str(cache), "--gradient_accumulation_steps", "4", "--parallelism.sequence_parallel_size", "2")
    (ours,) = cache.glob("reference-*.safetensors")
    theirs = Path((dpo_run / "train.log").read_text().split("cached in ")[1].split()[0])  # the shared folder has others
    assert ours.name != theirs.name
    theirs = load_file(theirs)
    for name, values in load_file(ours).items():
        torch.testing.assert_close(values, theirs[name], rtol=1e-4, atol=1e-4, msg=name)
    run, zero3 = scalars(out), scalars(dpo_run)
    for name in (*METRICS, "grad_norm"):  # not accuracies: step 1's rewards are rounding noise about 0, any sign
        if name != "rewards/accuracies":
            assert dict(run[f"train/{name}"])[1] == pytest.approx(dict(zero3[f"train/{name}"])[1], rel=1e-3,
                                                                   abs=1e-4), name
    evals = dict(run["eval/loss"])
    assert evals[0] == pytest.approx(0.693147, abs=1e-6) and evals[8] < evals[0]
    assert dict(run["eval/rewards/accuracies"])[8] <= 1.0
