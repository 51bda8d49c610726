from dataclasses import dataclass, field

import pytest

from sapretrain.config import ConfigError, dump_config, load_config, save_config


@dataclass
class Optim:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass
class Demo:
    name: str = "demo"
    steps: int = 100
    bf16: bool = False
    pretrained: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 200\noptim:\n  lr: 1e-3\n")
    cfg = load_config(Demo, path, ["optim.lr=2e-4", "bf16=true", "pretrained=openai"])
    assert cfg.steps == 200
    assert cfg.optim.lr == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string: coerced
    assert cfg.bf16 is True and cfg.pretrained == "openai"
    assert cfg.optim.betas == (0.9, 0.98)


def test_unknown_key_names_it_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(Demo, None, ["optim.lrr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("stpes: 3\n")
    with pytest.raises(ConfigError, match="stpes"):
        load_config(Demo, path)


def test_type_errors_are_reported():
    with pytest.raises(ConfigError, match="steps: expected int"):
        load_config(Demo, None, ["steps=fast"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Demo, None, ["steps"])
    with pytest.raises(ConfigError, match="optim.*expected a mapping"):
        load_config(Demo, None, ["optim=3"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Demo, None, ["steps=7", "optim.lr=0.1"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Demo, tmp_path / "config.yaml")
    assert again == cfg
    assert dump_config(again) == (tmp_path / "config.yaml").read_text()


def test_base_file_is_merged_under_the_variant(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 50\noptim:\n  lr: 0.5\n  betas: [0.8, 0.9]\n")
    (tmp_path / "variant.yaml").write_text("base: base.yaml\noptim:\n  lr: 0.25\n")
    cfg = load_config(Demo, tmp_path / "variant.yaml")
    assert cfg.steps == 50 and cfg.optim.lr == 0.25 and cfg.optim.betas == (0.8, 0.9)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(Demo, tmp_path / "loop.yaml")


def test_override_text_goes_to_string_fields_as_written():
    @dataclass
    class Run:
        precision: str = "bf16"
        flag: bool = True
        tag: str | None = "x"

    cfg = load_config(Run, None, ["precision=no", "flag=no", "tag=null"])
    assert cfg.precision == "no" and cfg.flag is False and cfg.tag is None
