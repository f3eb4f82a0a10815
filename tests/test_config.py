"""The config tree: defaults, YAML, overrides and their precedence, rejected keys."""

import pytest
import yaml

from lookaround_dist.config import ConfigError, RunConfig, load_config, save_config


def test_defaults_follow_the_paper():
    config = RunConfig()
    assert config.lookaround.k == 5
    assert config.optim.name == "sgd"
    assert config.optim.momentum == 0.9
    assert config.optim.lr == 0.1
    assert config.optim.warmup_epochs == 1.0
    assert config.optim.schedule == "cosine"


def test_command_line_beats_yaml_beats_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.05, "momentum": 0.8}, "lookaround": {"k": 2}}))
    config = load_config(path, ["optim.lr=0.01", "data.augmentations=[hflip,vflip,rotate]"])
    assert config.optim.lr == 0.01           # command line
    assert config.optim.momentum == 0.8      # YAML
    assert config.lookaround.k == 2          # YAML
    assert config.optim.weight_decay == 5e-4  # default
    assert config.data.augmentations == ["hflip", "vflip", "rotate"]


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["optim.learning_rate=0.1"])
    assert "unknown key optim.learning_rate" in str(error.value)
    assert "lr" in str(error.value) and "momentum" in str(error.value)


def test_unknown_section_lists_valid_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optimiser:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="valid sections: data, lookaround, model, optim, train, wandb"):
        load_config(path)


@pytest.mark.parametrize("override,message", [
    ("lookaround.k=0", "lookaround.k must be >= 1, found 0"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("lookaround.k=two", "lookaround.k expects an integer, found 'two'"),
    ("data.backend=opencv", "data.backend must be one of auto, dali, torchvision"),
    ("lookaround.num_branches=2", "one name per branch"),
])
def test_invalid_values_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_override_without_section_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["lr=0.1"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["optim.lr=0.02", "train.channels_last=true"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config


@pytest.mark.parametrize("name", ["demo", "cifar10", "cifar100", "imagenet_resnet50", "finetune_vit_b16"])
def test_shipped_configs_load(name):
    from conftest import REPO

    path = REPO / "configs" / f"{name}.yaml"
    assert path.is_file(), path
    load_config(path)
