"""lookaround-report on recorded metrics."""

import json

import pytest
import yaml

from lookaround_dist.cli.report import main

pytestmark = pytest.mark.timeout(120)


def write_run(folder, name, top1_by_epoch, losses, method=None):
    run = folder / name
    run.mkdir()
    records = [
        {"epoch": e, "test_top1": t, "test_top5": t + 30, "test_loss": 2.0 - e / 10,
         "train_loss": losses[e], "images_per_second": 100.0 + e, "wall_seconds": 10.0 * (e + 1)}
        for e, t in enumerate(top1_by_epoch)
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    config = {"train": {"method": method}} if method else {"train": {}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_report_table_and_plots(tmp_path):
    runs = [
        write_run(tmp_path, "lookaround-seed0", [40.0, 50.0], [[2.0, 2.1], [1.5, 1.6]]),
        write_run(tmp_path, "lookaround-seed1", [42.0, 54.0], [[2.0, 2.2], [1.4, 1.6]]),
        write_run(tmp_path, "sgd-seed0", [45.0, 52.0], [[1.9], [1.3]], method="sgd"),
    ]
    output = tmp_path / "report"
    assert main([str(r) for r in runs] + ["--output", str(output)]) == 0
    table = (output / "report.md").read_text()
    # Two lookaround seeds: final top-1 50 and 54 -> mean 52.00, sample standard deviation 2.83.
    assert "| lookaround | 2 | 52.00 ± 2.83 | 52.00 ± 2.83 |" in table
    assert "| sgd | 1 | 52.00 | 52.00 | 82.00 | 1.90 | 100.50 | 20.00 |" in table
    for name in ("test_top1.png", "train_loss.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in table
    assert not (output / "branch_distance.png").exists(), "no distance records, no plot"


def test_report_rejects_folder_without_metrics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 1
    assert "contains no metrics.jsonl" in capsys.readouterr().err


def test_report_rejects_missing_folder(tmp_path, capsys):
    output = tmp_path / "out"
    assert main([str(tmp_path / "no-such-run"), "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert f"run directory not found: {tmp_path / 'no-such-run'}" in error
    assert "contains no metrics.jsonl" not in error
    assert not output.exists()


def test_report_rejects_label_key_without_dot(tmp_path, capsys):
    run = write_run(tmp_path, "lookaround-seed0", [40.0], [[2.0]])
    output = tmp_path / "out"
    assert main([str(run), "--label-key", "method", "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert "--label-key must be SECTION.KEY" in error
    assert "got 'method'" in error
    assert "unpack" not in error
    assert not output.exists()


def test_report_rejects_missing_label_value(tmp_path, capsys):
    run = write_run(tmp_path, "lookaround-seed0", [40.0], [[2.0]], method="sgd")
    output = tmp_path / "out"
    assert main([str(run), "--label-key", "train.methd", "--output", str(output)]) == 1
    assert f"{run / 'config.yaml'} has no value train.methd" in capsys.readouterr().err
    assert not output.exists()


def test_report_labels_by_config_value(tmp_path):
    runs = [write_run(tmp_path, name, [top1], [[2.0]], method="lookaround")
            for name, top1 in (("a", 40.0), ("b", 50.0))]
    for run, lr in zip(runs, (0.1, 0.2)):
        (run / "config.yaml").write_text(yaml.safe_dump({"train": {"method": "lookaround"}, "optim": {"lr": lr}}))
    output = tmp_path / "out"
    assert main([str(r) for r in runs] + ["--label-key", "optim.lr", "--output", str(output)]) == 0
    table = (output / "report.md").read_text()
    assert "| 0.1 | 1 | 40.00 |" in table
    assert "| 0.2 | 1 | 50.00 |" in table


@pytest.mark.parametrize("lines, expected", [
    (['{"epoch": 0, "test_top1": 40.0}', '{"epoch": 1 "test_top1": 41.0}'],
     "line 2: invalid JSON (Expecting ',' delimiter at column 13)"),
    (['[1, 2]'], "line 1: expected a JSON object, found array"),
    (['{"epoch": 0, "test_top1": "high"}'], "line 1: expected a number for 'test_top1', found \"high\""),
    (['{"epoch": "0"}'], "line 1: expected an integer 'epoch', found \"0\""),
    (['{"epoch": 0, "train_loss": []}'],
     "line 1: expected a number or a non-empty list of numbers for 'train_loss', found []"),
    (['{"round": 1, "branch_distance": [0.5]}'], "contains no epoch records"),
])
def test_report_rejects_invalid_metrics(tmp_path, capsys, lines, expected):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    assert main([str(run), "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}" in error
    assert expected in error
    assert len(error.strip().splitlines()) == 1, error
    assert not output.exists()


def test_report_rejects_invalid_config(tmp_path, capsys):
    run = write_run(tmp_path, "lookaround-seed0", [40.0], [[2.0]])
    (run / "config.yaml").write_text("train: [unclosed\n")
    output = tmp_path / "out"
    assert main([str(run), "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert f"{run / 'config.yaml'}: invalid YAML" in error
    assert len(error.strip().splitlines()) == 1, error
    assert not output.exists()


def test_report_checks_every_run_before_writing(tmp_path, capsys):
    good = write_run(tmp_path, "lookaround-seed0", [40.0], [[2.0]])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text("not json\n")
    output = tmp_path / "out"
    assert main([str(good), str(bad), "--output", str(output)]) == 1
    assert f"{bad / 'metrics.jsonl'} line 1: invalid JSON" in capsys.readouterr().err
    assert not output.exists()


def test_report_rejects_output_file(tmp_path, capsys):
    run = write_run(tmp_path, "lookaround-seed0", [40.0], [[2.0]])
    output = tmp_path / "out"
    output.write_text("")
    assert main([str(run), "--output", str(output)]) == 2
    assert f"--output must be a folder, but {output} is a file" in capsys.readouterr().err


def test_report_shows_missing_keys_as_dash(tmp_path):
    run = tmp_path / "lookaround-seed0"
    run.mkdir()
    records = [{"epoch": 0, "test_top1": 40.0, "train_loss": [2.0, 2.1]},
               {"epoch": 1, "test_top1": 45.0, "train_loss": [1.8, 1.9], "test_loss": None}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    output = tmp_path / "out"
    assert main([str(run), "--output", str(output)]) == 0
    table = (output / "report.md").read_text()
    # No top-5, loss, images/s or wall time was recorded.
    assert "| lookaround | 1 | 45.00 | 45.00 | - | - | - | - |" in table


def test_help_is_plain_text(capsys):
    from lookaround_dist.cli import evaluate, report

    for command in (report.main, evaluate.main):
        with pytest.raises(SystemExit) as exit_info:
            command(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage:" in text, command.__module__
        assert "``" not in text, command.__module__
        if command is report.main:
            assert "(default: report)" in text
