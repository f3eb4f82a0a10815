"""The metrics file across a resume."""

import json

from lookaround_dist.metrics import read_metrics, truncate_metrics


def test_resume_drops_records_past_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    steps = [3, 6, 8, 11, 14]
    path.write_text("".join(json.dumps({"step": s, "value": s}) + "\n" for s in steps))
    assert truncate_metrics(path, 8) == 2
    assert [r["step"] for r in read_metrics(path)] == [3, 6, 8]
    assert truncate_metrics(path, 8) == 0
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_missing_metrics_file_left_alone(tmp_path):
    assert truncate_metrics(tmp_path / "metrics.jsonl", 5) == 0
    assert not (tmp_path / "metrics.jsonl").exists()
