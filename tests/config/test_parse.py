import pytest
import yaml

from loop import config
from loop.config import ConfigError


def write(tmp_path, body: dict):
    body.setdefault("data", {}).setdefault("train_files", ["x.jsonl"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_yaml_and_overrides_in_every_spelling(tmp_path):
    path = write(tmp_path, {"training": {"lr": 1e-3, "num_epochs": 2}})
    cfg = config.from_file(path, ["--lr", "1e-4", "--training.num_epochs=5", "--push_to_hub", "false",
                             "--train_files", "[a.jsonl, b.jsonl]", "--hub_model_id", "me/model"])
    assert cfg.training.lr == 1e-4  # YAML reads "1e-4" as a string; the float field converts it
    assert cfg.training.num_epochs == 5
    assert cfg.output.push_to_hub is False  # the original code parsed "false" as true
    assert [s.path for s in cfg.data.train_files] == ["a.jsonl", "b.jsonl"] and cfg.data.train_files[0].weight == 1
    assert cfg.output.hub_model_id == "me/model"


@pytest.mark.parametrize("body, overrides, key", [
    ({"training": {"lrr": 1}}, [], "training.lrr"),
    ({}, ["--nonsense", "1"], "--nonsense"),
    ({"training": {"num_epochs": "three"}}, [], "training.num_epochs"),
    ({"training": {"lr": -1.0}}, [], "training.lr"),
    ({}, ["--lr", "0"], "training.lr"),
    ({"data": {"packing": "zip"}}, [], "data.packing"),
    ({"output": {"push_to_hub": "yes please"}}, [], "output.push_to_hub"),
    ({"training": {"micro_batch_size": 0}}, [], "training.micro_batch_size"),
    ({"output": {"push_to_hub": True}}, [], "output.hub_model_id"),
    ({"trainer": {}}, [], "trainer"),
    ({"model": {"attn_implementation": "eager"}}, [], "model.attn_implementation.*data.packing: pad"),
    ({"data": {"format": "csv"}}, [], "data.format"),
    ({}, ["--profile_from", "1"], "training.profile_from.*warms the profiler up"),
    # Preference tuning: what it cannot do, said before any work.
    ({"training": {"objective": "ppo"}}, [], "training.objective"),
    ({"training": {"objective": "dpo"}, "data": {"packing": "concat"}}, [], "data.packing: concat would run a pair"),
    ({"training": {"objective": "dpo"}, "data": {"packing": "pad"}, "model": {"attn_implementation": "eager"}}, [],
     "model.attn_implementation: 'eager' cannot keep a pair's"),
    ({"training": {"objective": "dpo"}, "data": {"format": "sharegpt"}}, [], "data.format: 'sharegpt' does not apply"),
    ({"training": {"objective": "dpo"}}, ["--loss", "ipo", "--label_smoothing", "0.1"], "dpo.label_smoothing"),
    ({"training": {"objective": "dpo"}}, ["--reference", "live"], "dpo.reference: live needs lora.enabled"),
    ({}, ["--beta", "0"], "dpo.beta: must be > 0"),
    ({}, ["--label_smoothing", "0.5"], "dpo.label_smoothing: must be in"),
    ({}, ["--seq_len", "64", "--max_prompt_length", "31"], "dpo.max_prompt_length"),
])
def test_bad_values_stop_with_the_key_named(tmp_path, body, overrides, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        config.from_file(write(tmp_path, body), overrides)


def test_resolved_config_round_trips(tmp_path):
    cfg = config.from_file(write(tmp_path, {"training": {"lr": 5e-4}}), ["--seq_len", "256"])
    config.save(cfg, tmp_path / "resolved.yaml")
    again = config.from_dict(yaml.safe_load((tmp_path / "resolved.yaml").read_text()))
    assert again == cfg and again.data.seq_len == 256


def test_help_lists_every_key_with_its_default_and_comment():
    import dataclasses
    import subprocess
    import sys
    import typing

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "loop/train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    for section, cls in typing.get_type_hints(config.Config).items():
        assert f"{section}:" in lines
        for f in dataclasses.fields(cls):
            at = next(i for i, line in enumerate(lines) if line.startswith(f"  {f.name} = "))
            assert lines[at + 1].startswith("      ") and len(lines[at + 1].strip()) > 10, f.name  # its comment


@pytest.mark.parametrize("override, said", [(["--lrr", "1"], '--lrr: unknown key (did you mean "lr"?)'),
                                            (["--packing", "bdf"], '(did you mean "bfd"?)'),
                                            (["--training.lerning_rate", "1"], "training.lerning_rate: unknown key")])
def test_near_misses_get_a_did_you_mean(tmp_path, override, said):
    with pytest.raises(ConfigError) as e:
        config.from_file(write(tmp_path, {}), override)
    assert said in str(e.value)


def test_attention_that_ignores_the_mask_is_refused_for_packing():
    def run(packing: str, attention: str) -> config.Config:
        return config.from_dict({"data": {"train_files": ["x.jsonl"], "packing": packing},
                                 "model": {"attn_implementation": attention}})

    with pytest.raises(ConfigError, match="'eager' cannot keep packed dialogues apart"):
        run("bfd", "eager")
    assert run("pad", "eager").data.packing == "pad"  # one dialogue per row needs no isolation
    assert run("bfd", "auto").model.attn_implementation == "auto"


def test_the_shipped_recipes_read():
    from tests.conftest import ROOT

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = config.from_file(path)
        assert cfg.data.train_files, path
