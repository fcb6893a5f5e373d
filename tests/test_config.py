from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config import TrainConfig, load_config
from tunelab.errors import TunelabError

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_defaults_are_auto():
    cfg = TrainConfig(train_file="t.jsonl")
    assert cfg.model == "smollm2-135m-instruct" and cfg.method == "lora"
    assert cfg.epochs == cfg.batch_size == cfg.learning_rate == "auto"


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: a.jsonl\nlora:\n  r: 4\nepochs: 2\n")
    cfg = load_config(path, ["lora.alpha=8", "epochs=0.5", "output_dir=out/x"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.epochs, cfg.output_dir) == (4, 8, 0.5, Path("out/x"))


@pytest.mark.parametrize("text,overrides,field,needle", [
    ("train_file: a\nepochz: 3\n", [], "epochz", "did you mean 'epochs'"),
    ("train_file: a\nlora:\n  rank: 3\n", [], "lora.rank", "did you mean 'r'"),
    ("train_file: a\n", ["lora.r=0"], "lora.r", "greater than or equal to 1"),
    ("train_file: a\n", ["batch_size=0"], "batch_size", "greater than 0"),
    ("train_file: a\n", ["method=qlora2"], "method", "Input should be"),
    ("epochs: 1\n", [], "train_file", "required"),
])
def test_bad_config_names_file_and_field(tmp_path, text, overrides, field, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(TunelabError) as info:
        load_config(path, overrides)
    assert info.value.field == field and needle in str(info.value)
    assert str(path) in str(info.value)


def test_not_yaml_and_not_a_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(TunelabError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(TunelabError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(TunelabError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_bad_override_syntax():
    with pytest.raises(TunelabError, match="key=value"):
        load_config(None, ["train_file"])


def test_yaml_round_trip():
    cfg = TrainConfig(train_file="t.jsonl", lora={"r": 8})
    import yaml
    assert TrainConfig(**yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_config_parses(path):
    cfg = load_config(path)
    assert cfg.train_file


def test_there_are_example_configs():
    assert EXAMPLES, "examples/*.yaml are parsed by a test; ship at least one"
