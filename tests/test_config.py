"""The config tree: defaults, YAML, overrides and their precedence, rejected keys and values,
and the exit codes of lookaround-train for configuration errors."""

import logging
import re

import pytest
import yaml

from lookaround_dist.cli import train as train_cli
from lookaround_dist.config import (ConfigError, RunConfig, load_config, save_config, shell_brace_pattern,
                                    validate_config)
from lookaround_dist.topology import TopologyError


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


# ----- numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("1e-3", 0.001), ("2E-4", 2e-4), ("1e+2", 100.0), ("5", 5.0)])
def test_float_override_accepts_exponent(text, expected):
    config = load_config(None, [f"optim.lr={text}"])
    assert config.optim.lr == expected


def test_yaml_file_accepts_exponent(tmp_path):
    # YAML 1.1 reads 1e-3 (no decimal point) as a string, 1.0e-3 as a number.
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5e-4\ndata:\n  mean: [4e-1, 0.5, 5e-1]\n")
    config = load_config(path)
    assert config.optim.lr == 0.001
    assert config.optim.weight_decay == 5e-4
    assert config.data.mean == [0.4, 0.5, 0.5]


@pytest.mark.parametrize("override,message", [
    ("lookaround.k=1.5", "lookaround.k expects an integer, found 1.5"),
    ("lookaround.k=1e3", "lookaround.k expects an integer, found '1e3'"),
    ("optim.milestones=[10,1.5]", "optim.milestones[1] expects an integer, found 1.5"),
    ("optim.lr=fast", "optim.lr expects a number, found 'fast'"),
    ("optim.lr=true", "optim.lr expects a number, found True"),
    ("optim.lr=nan", "optim.lr expects a finite number, found 'nan'"),
    ("optim.lr=.inf", "optim.lr expects a finite number, found inf"),
    ("optim.lr=1e400", "optim.lr expects a finite number, found '1e400'"),
])
def test_non_numbers_rejected(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


# ----- ranges ----------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("train.max_steps_per_epoch=-1",
     "train.max_steps_per_epoch must be >= 0 (0 means the whole epoch), found -1"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0 (0 disables the warm-up), found -1.0"),
    ("train.timeout_seconds=0", "train.timeout_seconds must be > 0, found 0.0"),
    ("data.prefetch_depth=0", "data.prefetch_depth must be >= 1, found 0"),
    ("optim.momentum=-1", "optim.momentum must lie in [0, 1), found -1.0"),
    ("optim.momentum=1", "optim.momentum must lie in [0, 1), found 1.0"),
    ("data.hw_decoder_load=2", "data.hw_decoder_load must lie in [0, 1], found 2.0"),
    ("train.stop_after_steps=-5", "train.stop_after_steps must be >= 0 (0 never stops early), found -5"),
    ("train.threads_per_rank=-2",
     "train.threads_per_rank must be >= 0 (0 lets OMP_NUM_THREADS decide), found -2"),
    ("optim.lr=0", "optim.lr must be > 0, found 0.0"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0, found -0.0001"),
    ("optim.gamma=0", "optim.gamma must lie in (0, 1], found 0.0"),
    ("optim.gamma=2", "optim.gamma must lie in (0, 1], found 2.0"),
    ("train.lookahead_alpha=0", "train.lookahead_alpha must lie in (0, 1], found 0.0"),
    ("train.bn_recalibration_batches=-1", "train.bn_recalibration_batches must be >= 0, found -1"),
    ("train.swa_lr=-0.1", "train.swa_lr must be >= 0 (0 keeps the schedule), found -0.1"),
    ("model.num_classes=0", "model.num_classes must be >= 1, found 0"),
    ("optim.milestones=[10,-1]", "optim.milestones[1] must be >= 0 (epochs), found -1"),
])
def test_out_of_range_rejected(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize("override", [
    "train.max_steps_per_epoch=0", "optim.warmup_epochs=0", "train.threads_per_rank=0",
    "train.stop_after_steps=0", "data.num_workers=0", "data.hw_decoder_load=0",
    "data.hw_decoder_load=1", "optim.momentum=0", "optim.weight_decay=0", "optim.gamma=1",
    "train.lookahead_alpha=1", "train.bn_recalibration_batches=0", "train.swa_lr=0",
    "optim.milestones=[0,5]", "data.std=[1,1,1]", "data.mean=[0,0,0]",
])
def test_boundary_values_accepted(override):
    load_config(None, [override])


@pytest.mark.parametrize("override,message", [
    ("data.mean=[a,b,c]", "data.mean[0] expects a number, found 'a'"),
    ("data.mean=[0.5,0.5]", "data.mean needs 3 numbers, found 2: [0.5, 0.5]"),
    ("data.std=[0.2,0.2,0.2,0.2]", "data.std needs 3 numbers, found 4"),
    ("data.mean=[125.3,123.0,113.9]",
     "data.mean[0] must lie in [0, 1] (RGB on the 0..1 scale), found 125.3"),
    ("data.std=[0.2,0,0.2]", "data.std[1] must lie in (0, 1] (RGB on the 0..1 scale), found 0.0"),
])
def test_mean_and_std_need_three_numbers(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_mean_accepts_comma_separated_numbers():
    config = load_config(None, ["data.mean=0.5,0.25,1e-1"])
    assert config.data.mean == [0.5, 0.25, 0.1]


def test_range_check_rejects_nan_set_in_code():
    config = RunConfig()
    config.optim.momentum = float("nan")
    with pytest.raises(ConfigError, match=re.escape("optim.momentum must lie in [0, 1), found nan")):
        validate_config(config)


# ----- repeated overrides ----------------------------------------------------------------

def test_brace_expansion_gets_quoting_hint():
    # What bash passes for an unquoted data.train_path=demo/cifar10/train-{000000..000003}.tar.gz
    expanded = [f"data.train_path=demo/cifar10/train-{shard:06d}.tar.gz" for shard in range(4)]
    with pytest.raises(ConfigError) as error:
        load_config(None, ["optim.lr=0.05", *expanded])
    message = str(error.value)
    assert "data.train_path is given 4 times on the command line" in message
    assert "'demo/cifar10/train-000003.tar.gz'" in message
    assert "quote the argument, as in 'data.train_path=demo/cifar10/train-{000000..000003}.tar.gz'" in message


def test_repeated_key_apart_gets_no_hint():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["optim.lr=0.1", "lookaround.k=3", "optim.lr=0.2"])
    message = str(error.value)
    assert "optim.lr is given 2 times on the command line ('0.1', '0.2'); give each key once" in message
    assert "quote" not in message


def test_two_bare_adjacent_values_get_no_hint():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["lookaround.k=3", "lookaround.k=4"])
    message = str(error.value)
    assert "lookaround.k is given 2 times on the command line ('3', '4'); give each key once" in message
    assert "quote" not in message


def test_three_adjacent_words_get_comma_hint():
    expanded = ["data.augmentations=hflip", "data.augmentations=vflip", "data.augmentations=randaugment"]
    with pytest.raises(ConfigError) as error:
        load_config(None, expanded)
    assert "as in 'data.augmentations={hflip,vflip,randaugment}'" in str(error.value)


def test_repeated_equal_override_rejected():
    with pytest.raises(ConfigError, match=re.escape("lookaround.k is given 2 times")) as error:
        load_config(None, ["lookaround.k=3", "lookaround.k=3"])
    assert "quote" not in str(error.value)


@pytest.mark.parametrize("values,pattern", [
    (["train-000000.tar", "train-000001.tar", "train-000002.tar"], "train-{000000..000002}.tar"),
    (["x8", "x9", "x10"], "x{8..10}"),
    (["x3", "x2", "x1"], "x{3..1}"),
    (["s-00.tar", "s-02.tar", "s-04.tar"], "s-{00..04..2}.tar"),
    (["hflip", "vflip"], "{hflip,vflip}"),
    (["data/a.tar", "data/b.tar"], "data/{a,b}.tar"),
    (["1", "3", "4"], "{1,3,4}"),
    (["a,b", "c"], None),
    (["same", "same"], None),
    (["only"], None),
])
def test_shell_brace_pattern(values, pattern):
    assert shell_brace_pattern(values) == pattern


# ----- config files ----------------------------------------------------------------------

def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: 0.1\ndata:\n  augmentations: [hflip,\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path} is not valid YAML: ")
    assert "at line 5, column 1" in message


def test_invalid_yaml_names_unclosed_bracket(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: 0.1\n  milestones: [10, 20\ntrain:\n  epochs: 30\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "but got ':' at line 4, column 6" in message
    assert "(while parsing a flow sequence that starts at line 3, column 15)" in message


def test_yaml_with_invalid_bytes_rejected(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"optim:\n  lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} is not valid YAML: ")):
        load_config(path)


def test_missing_config_file_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_config("configs/missing.yaml")
    assert str(error.value) == (f"config file not found: configs/missing.yaml "
                                f"(relative to the current folder {tmp_path})")


def test_config_folder_rejected(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path} is a folder")):
        load_config(tmp_path)


# ----- lookaround-train exit codes and argument order ------------------------------------

@pytest.fixture
def train_output(capsys, monkeypatch):
    """Run ``lookaround-train`` in this process as rank 0; return (exit code, output)."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    saved_handlers, saved_level = logging.root.handlers[:], logging.root.level

    def run(*arguments: str) -> tuple[int, str]:
        code = train_cli.main(list(arguments))
        return code, capsys.readouterr().out

    yield run
    logging.root.handlers[:] = saved_handlers  # main() points logging at this test's stdout
    logging.root.setLevel(saved_level)


def test_overrides_accepted_after_options():
    args = train_cli.parse_args(["--dry-run", "lookaround.k=4", "--config", "configs/demo.yaml",
                                 "train.epochs=1", "--world-size", "3", "optim.lr=1e-3"])
    assert args.overrides == ["lookaround.k=4", "train.epochs=1", "optim.lr=1e-3"]
    assert args.config == "configs/demo.yaml"
    assert args.world_size == 3
    assert args.dry_run


def test_cli_invalid_yaml_exits_2(tmp_path, train_output):
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1,\n")
    code, output = train_output("--dry-run", "--config", str(path))
    assert code == 2, output
    assert f"invalid configuration: {path} is not valid YAML: " in output
    assert "line 2, column 1" in output
    assert "Traceback" not in output


def test_cli_missing_config_exits_2(tmp_path, train_output):
    code, output = train_output("--dry-run", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2, output
    assert f"invalid configuration: config file not found: {tmp_path / 'missing.yaml'}" in output


def test_cli_repeated_override_exits_2(train_output):
    code, output = train_output("--dry-run", "lookaround.k=3", "lookaround.k=4")
    assert code == 2, output
    assert "invalid configuration: lookaround.k is given 2 times" in output


def test_cli_layout_error_of_trainer_exits_2(train_output, monkeypatch):
    from conftest import REPO

    # The demo's d=3 branches do not fit W=2; the trainer finds this before any process group.
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, output = train_output("--config", str(REPO / "configs" / "demo.yaml"))
    assert code == 2, output
    assert "invalid configuration: TopologyError: world size W=2 does not fit d=3 branches" in output


@pytest.mark.parametrize("error,expected_code", [
    (ConfigError("a config problem"), 2),
    (TopologyError("a layout problem"), 2),
    (ValueError("a data problem"), 1),
])
def test_cli_trainer_error_exit_codes(error, expected_code, train_output, monkeypatch):
    monkeypatch.setattr("lookaround_dist.trainer.Trainer", failing_trainer(error))
    code, output = train_output("lookaround.k=3")
    assert code == expected_code, output
    assert f"{type(error).__name__}: {error}" in output
    assert "Traceback" not in output


def test_cli_unexpected_error_keeps_traceback(train_output, monkeypatch):
    monkeypatch.setattr("lookaround_dist.trainer.Trainer", failing_trainer(RuntimeError("out of memory")))
    code, output = train_output("lookaround.k=3")
    assert code == 1, output
    assert "unexpected error: out of memory" in output
    assert "Traceback" in output


def failing_trainer(error: Exception) -> type:
    """Return a Trainer stand-in whose constructor raises ``error``."""

    class FailingTrainer:
        def __init__(self, config, resume=False):
            raise error

    return FailingTrainer
