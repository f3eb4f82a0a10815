"""``lookaround-report``: plots and a Markdown table from the metrics of one or more runs.

    lookaround-report runs/lookaround-seed0 runs/lookaround-seed1 runs/sgd-seed0 --output report/

Runs are grouped by their label: ``--label-key`` names a config value (``section.key``)
whose value labels the run. By default the label is the method when the config has one,
else the run directory's name without a trailing ``-seedN``; ``--label-by-directory``
always takes the directory's name. For each group the table gives the mean and the
spread (sample standard deviation) over its runs of the final and best test top-1, the
final top-5 and loss (NLL), images/s and wall time. A second table gives, where runs
recorded them, the final mean top-1 of the single branches, their logit ensemble, the
consensus with recomputed BatchNorm statistics and the SWA model. The plots show test
top-1 and training loss against the epoch, and the branches' distance to the consensus
against the round, one line per group (the mean over its runs).

Epoch records carry an ``epoch`` key; round records (diversity measurements) carry a
``round`` key.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import yaml

from ..metrics import read_metrics


def run_label(run_dir: Path, config: dict, label_key: str | None, by_directory: bool = False) -> str:
    if by_directory:
        return re.sub(r"-seed\d+$", "", run_dir.name)
    if label_key:
        section, key = label_key.split(".", 1)
        return str(config.get(section, {}).get(key, "?"))
    method = config.get("train", {}).get("method") or config.get("method")
    if method:
        return str(method)
    return re.sub(r"-seed\d+$", "", run_dir.name)


def load_run(run_dir: Path, label_key: str | None, by_directory: bool = False) -> tuple[str, list[dict], list[dict]]:
    """Return the run's label, its epoch records and its round records."""
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{run_dir} contains no metrics.jsonl")
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    all_records = read_metrics(metrics_file)
    records = [r for r in all_records if "epoch" in r and "round" not in r]
    rounds = [r for r in all_records if "round" in r]
    if not records:
        raise ValueError(f"{metrics_file} contains no epoch records")
    return run_label(run_dir, config or {}, label_key, by_directory), records, rounds


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


def last_mean(key: str):
    """Return a picker of the mean of the per-branch list in the last record that has ``key``."""
    def pick(records: list[dict]):
        values = [r[key] for r in records if r.get(key) is not None]
        return statistics.mean(values[-1]) if values else None
    return pick


def last_present(key: str):
    """Return a picker of the value of ``key`` in the last record that has it."""
    def pick(records: list[dict]):
        values = [r[key] for r in records if r.get(key) is not None]
        return values[-1] if values else None
    return pick


MODEL_COLUMNS = (
    ("branch top-1 (mean)", last_mean("branch_test_top1")),
    ("ensemble top-1", last_present("ensemble_test_top1")),
    ("recalibrated BN top-1", last_present("recalibrated_test_top1")),
    ("SWA top-1", last_present("swa_test_top1")),
)


def summary_rows(groups: dict[str, list[list[dict]]], columns=COLUMNS) -> list[str]:
    """Markdown rows: per group, mean ± sample standard deviation of each column over its runs."""
    names = [name for name, _ in columns]
    rows = ["| method | runs | " + " | ".join(names) + " |", "| --- " * (len(names) + 2) + "|"]
    for label, runs in groups.items():
        cells = []
        for _, pick in columns:
            values = [v for v in (pick(records) for records in runs) if v is not None]
            cells.append(mean_spread(values))
        rows.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return rows


def has_any(groups: dict[str, list[list[dict]]], pick) -> bool:
    return any(pick(records) is not None for runs in groups.values() for records in runs)


def mean_curve(runs: list[list[dict]], key: str, x_key: str = "epoch") -> tuple[list[int], list[float]]:
    by_x: dict[int, list[float]] = {}
    for records in runs:
        for record in records:
            value = record.get(key)
            if isinstance(value, list):  # one value per branch: their mean
                value = statistics.mean(value)
            if value is not None:
                by_x.setdefault(record[x_key], []).append(value)
    xs = sorted(by_x)
    return xs, [statistics.mean(by_x[x]) for x in xs]


def plot(groups: dict[str, list[list[dict]]], key: str, ylabel: str, path: Path, x_key: str = "epoch",
         log_y: bool = False) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(6, 4))
    drawn = False
    for index, (label, runs) in enumerate(groups.items()):
        xs, values = mean_curve(runs, key, x_key)
        if xs:
            # A color per label position, so that a method keeps its color in every plot.
            axes.plot(xs, values, marker="o" if len(xs) < 100 else None, markersize=3, label=label,
                      color=f"C{index % 10}")
            drawn = True
    if drawn:
        axes.set_xlabel(x_key)
        axes.set_ylabel(ylabel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log_y:
            # Branches that are averaged stay orders of magnitude closer than those that are not.
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lookaround-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--output", default="report", help="folder for report.md and the PNG plots")
    parser.add_argument("--label-key", help="config value (section.key) that labels each run")
    parser.add_argument("--label-by-directory", action="store_true",
                        help="label each run by its directory name without a trailing -seedN")
    args = parser.parse_args(argv)

    groups: dict[str, list[list[dict]]] = {}
    round_groups: dict[str, list[list[dict]]] = {}
    for run in args.runs:
        try:
            label, records, rounds = load_run(Path(run), args.label_key, args.label_by_directory)
        except (FileNotFoundError, ValueError) as error:
            print(f"lookaround-report: {error}", file=sys.stderr)
            return 1
        groups.setdefault(label, []).append(records)
        round_groups.setdefault(label, []).append(rounds)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    lines = ["# Run comparison", "", *summary_rows(groups), ""]
    model_columns = tuple(c for c in MODEL_COLUMNS if has_any(groups, c[1]))
    if model_columns:
        lines += ["Final test top-1 of the single branches, their logit ensemble, the consensus with "
                  "recomputed BatchNorm statistics and the SWA model:", "",
                  *summary_rows(groups, model_columns), ""]
    figures = (
        (groups, "test_top1", "test top-1 (%)", "test_top1.png", "epoch", False),
        (groups, "train_loss", "training loss (mean over branches)", "train_loss.png", "epoch", False),
        (round_groups, "branch_distance", "L2 distance to the consensus (mean over branches)",
         "branch_distance.png", "round", True),
        (round_groups, "pairwise_distance_rms", "RMS pairwise L2 distance between branches",
         "pairwise_distance.png", "round", True),
    )
    for source, key, ylabel, name, x_key, log_y in figures:
        if plot(source, key, ylabel, output / name, x_key, log_y):
            lines += [f"![{ylabel}]({name})", ""]
    (output / "report.md").write_text("\n".join(lines))
    print(f"wrote {output / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
