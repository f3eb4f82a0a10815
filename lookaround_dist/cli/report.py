"""``lookaround-report``: plots and a Markdown table from the metrics of one or more runs.

    lookaround-report runs/lookaround-seed0 runs/lookaround-seed1 runs/sgd-seed0 --output report/

Runs are grouped by their label: ``--label-key`` names a config value (``section.key``)
whose value labels the run (by default the method when the config has one, else the run
directory's name without a trailing ``-seedN``). For each group the table gives the mean
and the spread (sample standard deviation) over its runs of the final and best test top-1,
the final top-5 and loss (NLL), images/s and wall time. The plots show test top-1 and
training loss against the epoch, one line per group (the mean over its runs).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import yaml

from ..metrics import read_metrics


def run_label(run_dir: Path, config: dict, label_key: str | None) -> str:
    if label_key:
        section, key = label_key.split(".", 1)
        return str(config.get(section, {}).get(key, "?"))
    method = config.get("train", {}).get("method") or config.get("method")
    if method:
        return str(method)
    return re.sub(r"-seed\d+$", "", run_dir.name)


def load_run(run_dir: Path, label_key: str | None) -> tuple[str, list[dict]]:
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl")
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    records = [r for r in read_metrics(metrics_file) if "epoch" in r]
    if not records:
        raise ValueError(f"{metrics_file} holds no epoch records")
    return run_label(run_dir, config or {}, label_key), records


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def best_top1(records: list[dict]):
    return max((r["test_top1"] for r in records if "test_top1" in r), default=None)


def mean_speed(records: list[dict]):
    return statistics.mean(r["images_per_second"] for r in records)


def last(key: str):
    return lambda records: records[-1].get(key)


COLUMNS = (
    ("final top-1", last("test_top1")),
    ("best top-1", best_top1),
    ("final top-5", last("test_top5")),
    ("final NLL", last("test_loss")),
    ("images/s", mean_speed),
    ("wall time (s)", last("wall_seconds")),
)


def summary_rows(groups: dict[str, list[list[dict]]]) -> list[str]:
    """Markdown rows: per group, mean ± sample standard deviation of each column over its runs."""
    names = [name for name, _ in COLUMNS]
    rows = ["| method | runs | " + " | ".join(names) + " |", "| --- " * (len(names) + 2) + "|"]
    for label, runs in groups.items():
        cells = []
        for _, pick in COLUMNS:
            values = [v for v in (pick(records) for records in runs) if v is not None]
            cells.append(mean_spread(values))
        rows.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return rows


def mean_curve(runs: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for records in runs:
        for record in records:
            value = record.get(key)
            if isinstance(value, list):  # one value per branch: their mean
                value = statistics.mean(value)
            if value is not None:
                by_epoch.setdefault(record["epoch"], []).append(value)
    epochs = sorted(by_epoch)
    return epochs, [statistics.mean(by_epoch[e]) for e in epochs]


def plot(groups: dict[str, list[list[dict]]], key: str, ylabel: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    drawn = False
    for label, runs in groups.items():
        epochs, values = mean_curve(runs, key)
        if epochs:
            axes.plot(epochs, values, marker="o", markersize=3, label=label)
            drawn = True
    if drawn:
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lookaround-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--output", default="report", help="folder for report.md and the PNG plots")
    parser.add_argument("--label-key", help="config value (section.key) that labels each run")
    args = parser.parse_args(argv)

    groups: dict[str, list[list[dict]]] = {}
    for run in args.runs:
        try:
            label, records = load_run(Path(run), args.label_key)
        except (FileNotFoundError, ValueError) as error:
            print(f"lookaround-report: {error}", file=sys.stderr)
            return 1
        groups.setdefault(label, []).append(records)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    lines = ["# Run comparison", "", *summary_rows(groups), ""]
    for key, ylabel, name in (("test_top1", "test top-1 (%)", "test_top1.png"),
                              ("train_loss", "training loss (mean over branches)", "train_loss.png"),
                              ("branch_distance", "branch distance to the consensus", "branch_distance.png")):
        if plot(groups, key, ylabel, output / name):
            lines += [f"![{ylabel}]({name})", ""]
    (output / "report.md").write_text("\n".join(lines))
    print(f"wrote {output / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
