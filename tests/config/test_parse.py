import os
import re
from pathlib import Path

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


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # 1 KB, 9^9 values once every alias is followed
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")) + "data: *i\n"


@pytest.mark.parametrize("body, said", [
    (BOMB.encode(), r"config file \S+: its YAML aliases expand to more than [\d,]+ values; write the values out$"),
    (b"training:\n  lr: 1\n   seed: 2\n", r"config file \S+: invalid YAML at line 3, column 8: mapping values are "
                                            r"not allowed here$"),
    (b"training:\n  lr: [1, 2\n", r"config file \S+: invalid YAML at line 3, column 1: expected ',' or ']'"),
    ("model:\n  name_or_path: caf\u00e9\n".encode("latin-1"), r"config file \S+ is not UTF-8 text \(invalid "
                                                               r"continuation byte at byte 26\)$"),
    (b"model: !!python/object/apply:os.system [echo pwned]\n", r"config file \S+: invalid YAML at line 1, column 8: "
                                                               r"could not determine a constructor for the tag"),
    (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", r"config file \S+: invalid YAML"),
])
def test_a_config_that_is_not_safe_yaml_is_one_line_without_its_value(tmp_path, body, said):
    path = tmp_path / "run.yaml"
    path.write_bytes(body)
    with pytest.raises(ConfigError) as refused:
        config.from_file(path)
    assert len(str(refused.value).splitlines()) == 1 and len(str(refused.value)) < 300
    assert re.search(said, str(refused.value)), str(refused.value)


def test_an_alias_bomb_in_an_override_and_a_huge_value_are_refused_short(tmp_path):
    with pytest.raises(ConfigError, match="^--training.lr: its YAML aliases expand"):
        config.from_file(write(tmp_path, {}), ["--training.lr", "{" + BOMB.replace("\n", ", ")[:-2] + "}"])
    with pytest.raises(ConfigError) as refused:
        config.from_file(write(tmp_path, {"training": {"lr": ["x" * 1000] * 1000}}))
    assert str(refused.value).startswith("training.lr: expected a number, got ['xxx") and len(str(refused.value)) < 400


def test_a_config_that_is_no_readable_file_is_named_with_the_reason(tmp_path, monkeypatch):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    with pytest.raises(ConfigError, match=r"^config file \S+fifo.yaml is a named pipe \(FIFO\), not a file$"):
        config.from_file(fifo)
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"^config file \S+dir.yaml is a directory, not a file$"):
        config.from_file(tmp_path / "dir.yaml")
    with pytest.raises(ConfigError, match=r"^config file \S+nope.yaml does not exist$"):
        config.from_file(tmp_path / "nope.yaml")
    path = write(tmp_path, {})

    def denied(self):  # tests run as root, whom file modes do not stop: the error itself
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"^config file \S+run.yaml cannot be read \(Permission denied\)$"):
        config.from_file(path)
