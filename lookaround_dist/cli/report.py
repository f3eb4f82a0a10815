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
against the round, one line per group (the mean over its runs). A value that no record
of a run has is shown as "-".

Epoch records carry an ``epoch`` key; round records (diversity measurements) carry a
``round`` key. Every input is read and checked before the output folder is created.
Exit status: 0 on success, 1 for a missing or invalid run directory or file, 2 for
invalid command-line options.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import yaml

DESCRIPTION = "Write a Markdown table and plots that compare the metrics of one or more training runs."

EPILOG = """\
example:
  lookaround-report runs/lookaround-seed0 runs/lookaround-seed1 runs/sgd-seed0 --output report/

Each run directory must contain metrics.jsonl (one JSON object per line, as the trainer
writes it); config.yaml is read when present. Runs are grouped by label: by default the
config's train.method, else the directory name without a trailing -seedN. The table
gives the mean and sample standard deviation over each group's runs; "-" marks a value
that no run recorded. The output folder receives report.md and PNG plots of test top-1,
training loss and, where recorded, the branches' distances to the consensus.

exit status: 0 on success, 1 for a missing or invalid run directory or file,
2 for invalid command-line options.
"""

# Record keys that the report reads, by the type their values must have. None stands for
# a value that was not measured, like a missing key.
NUMBER_KEYS = ("test_top1", "test_top5", "test_loss", "images_per_second", "wall_seconds",
               "ensemble_test_top1", "recalibrated_test_top1", "swa_test_top1",
               "pairwise_distance_rms")
PER_BRANCH_KEYS = ("train_loss", "branch_test_top1", "branch_distance")
"""Keys whose value is one number per branch (a list) or a single number."""
INTEGER_KEYS = ("epoch", "round")


class ReportError(Exception):
    """A run directory or file that the report cannot use; the message names the path."""


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def check_record(record, where: str) -> None:
    """Raise ReportError unless ``record`` is a JSON object whose known keys have usable values."""
    if not isinstance(record, dict):
        raise ReportError(f"{where}: expected a JSON object, found {type_name(record)}")
    for key in INTEGER_KEYS:
        if key in record and (not isinstance(record[key], int) or isinstance(record[key], bool)):
            raise ReportError(f"{where}: expected an integer '{key}', found {json.dumps(record[key])}")
    for key in NUMBER_KEYS:
        value = record.get(key)
        if value is not None and not is_number(value):
            raise ReportError(f"{where}: expected a number for '{key}', found {json.dumps(value)}")
    for key in PER_BRANCH_KEYS:
        value = record.get(key)
        if value is None or is_number(value):
            continue
        if not isinstance(value, list) or not value or not all(is_number(v) for v in value):
            raise ReportError(f"{where}: expected a number or a non-empty list of numbers for "
                              f"'{key}', found {json.dumps(value)}")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ReportError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ReportError(f"cannot read {path}: {error.strerror}") from None


def read_records(metrics_file: Path) -> list[dict]:
    """Parse and check a metrics file, naming the file and line of the first invalid record."""
    records = []
    for number, line in enumerate(read_text(metrics_file).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metrics_file} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        check_record(record, where)
        records.append(record)
    return records


def read_config(config_file: Path) -> dict:
    """Return the run's resolved configuration, or {} when the run has no config.yaml."""
    if not config_file.is_file():
        return {}
    try:
        config = yaml.safe_load(read_text(config_file))
    except yaml.YAMLError as error:
        # PyYAML's messages span several lines, so they are joined into one.
        raise ReportError(f"{config_file}: invalid YAML ({' '.join(str(error).split())})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ReportError(f"{config_file}: expected a mapping of config sections, found {type_name(config)}")
    return config


def directory_label(run_dir: Path) -> str:
    return re.sub(r"-seed\d+$", "", run_dir.name)


def run_label(run_dir: Path, config: dict, label_key: str | None, by_directory: bool = False) -> str:
    """Return the label that groups the run. ``label_key`` is ``section.key`` or None."""
    if by_directory:
        return directory_label(run_dir)
    if label_key:
        section, key = label_key.split(".", 1)
        values = config.get(section)
        if not (run_dir / "config.yaml").is_file():
            raise ReportError(f"{run_dir} contains no config.yaml, which --label-key {label_key} reads")
        if not isinstance(values, dict) or key not in values:
            raise ReportError(f"{run_dir / 'config.yaml'} has no value {label_key} (given by --label-key)")
        return str(values[key])
    train = config.get("train")
    method = (train.get("method") if isinstance(train, dict) else None) or config.get("method")
    if method:
        return str(method)
    return directory_label(run_dir)


def load_run(run_dir: Path, label_key: str | None, by_directory: bool = False) -> tuple[str, list[dict], list[dict]]:
    """Return the run's label, its epoch records and its round records, or raise ReportError."""
    if not run_dir.exists():
        raise ReportError(f"run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory, but a run directory is a folder containing metrics.jsonl")
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise ReportError(f"{run_dir} contains no metrics.jsonl")
    config = read_config(run_dir / "config.yaml")
    all_records = read_records(metrics_file)
    records = [r for r in all_records if "epoch" in r and "round" not in r]
    rounds = [r for r in all_records if "round" in r]
    if not records:
        raise ReportError(f"{metrics_file} contains no epoch records (objects with an 'epoch' key)")
    return run_label(run_dir, config, label_key, by_directory), records, rounds


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def branch_mean(value):
    """Return the mean of a per-branch list, or a single number unchanged."""
    return statistics.mean(value) if isinstance(value, list) else value


def best_top1(records: list[dict]):
    return max((r["test_top1"] for r in records if r.get("test_top1") is not None), default=None)


def mean_speed(records: list[dict]):
    values = [r["images_per_second"] for r in records if r.get("images_per_second") is not None]
    return statistics.mean(values) if values else None


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
        return branch_mean(values[-1]) if values else None
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
            if value is not None:
                by_x.setdefault(record[x_key], []).append(branch_mean(value))
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lookaround-report", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories containing metrics.jsonl")
    parser.add_argument("--output", default="report", metavar="FOLDER",
                        help="folder for report.md and the PNG plots, created when missing (default: %(default)s)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--label-key", metavar="SECTION.KEY",
                        help="config value that labels each run, for example train.method or optim.lr")
    labels.add_argument("--label-by-directory", action="store_true",
                        help="label each run by its directory name without a trailing -seedN")
    return parser.parse_args(argv)


def check_options(args: argparse.Namespace) -> str | None:
    """Return what is wrong with the command-line options, or None when they are valid."""
    if args.label_key is not None:
        section, dot, key = args.label_key.partition(".")
        if not (section and dot and key):
            return f"--label-key must be SECTION.KEY, a config value such as train.method, got '{args.label_key}'"
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        return f"--output must be a folder, but {output} is a file"
    return None


def report_lines(groups: dict[str, list[list[dict]]]) -> list[str]:
    lines = ["# Run comparison", "", *summary_rows(groups), ""]
    model_columns = tuple(c for c in MODEL_COLUMNS if has_any(groups, c[1]))
    if model_columns:
        lines += ["Final test top-1 of the single branches, their logit ensemble, the consensus with "
                  "recomputed BatchNorm statistics and the SWA model:", "",
                  *summary_rows(groups, model_columns), ""]
    return lines


def write_report(output: Path, lines: list[str], groups: dict[str, list[list[dict]]],
                 round_groups: dict[str, list[list[dict]]]) -> None:
    lines = list(lines)
    output.mkdir(parents=True, exist_ok=True)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_options(args)
    if problem:
        print(f"lookaround-report: error: {problem}", file=sys.stderr)
        return 2

    groups: dict[str, list[list[dict]]] = {}
    round_groups: dict[str, list[list[dict]]] = {}
    for run in args.runs:
        try:
            label, records, rounds = load_run(Path(run), args.label_key, args.label_by_directory)
        except ReportError as error:
            print(f"lookaround-report: error: {error}", file=sys.stderr)
            return 1
        groups.setdefault(label, []).append(records)
        round_groups.setdefault(label, []).append(rounds)

    output = Path(args.output)
    lines = report_lines(groups)
    try:
        write_report(output, lines, groups, round_groups)
    except OSError as error:
        print(f"lookaround-report: error: cannot write the report to {output}: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
