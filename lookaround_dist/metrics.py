"""Run outputs: logging set-up, the metrics file (JSON lines) and a terminal progress line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional


def setup_logging(rank: int, all_ranks: bool = False) -> None:
    """Log from rank 0 (or every rank), each line prefixed with the rank."""
    level = logging.INFO if rank == 0 or all_ranks else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stdout, force=True,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S",
    )


class MetricsWriter:
    """Appends one JSON object a line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Optional[Path]):
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=False) + "\n")


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop records of steps after ``last_step`` from a metrics file; return how many.

    A run resumed from a checkpoint repeats the steps after it, and their records with
    them, so the records that a stopped run wrote past its checkpoint are removed first.
    The file is replaced atomically.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    if len(kept) == len(lines):
        return 0
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)
    return len(lines) - len(kept)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A one-line progress display on interactive terminals; silent otherwise."""

    def __init__(self, enabled: bool, total: int, prefix: str):
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self.prefix = prefix
        self.started = time.perf_counter()

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(1, self.total))
        rate = done / max(1e-9, time.perf_counter() - self.started)
        sys.stderr.write(
            f"\r{self.prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"loss {loss:.4f} {rate:.1f} steps/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
