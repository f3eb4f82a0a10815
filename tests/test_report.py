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
