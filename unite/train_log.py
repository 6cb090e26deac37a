"""The training metrics: a row per log interval in `metrics.tsv` and the latest row in
`metrics.json`, and the window of steps a row averages."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unite.train_step import LOSS_PARTS, StepResult

METRIC_COLUMNS = ("step", "epoch", *LOSS_PARTS, "lr", "grad_norm", "images_per_s", "skipped_steps")


class MetricsLog:
    """Rows of METRIC_COLUMNS in `metrics.tsv` (for `dvc plots`) and the latest row plus
    `max_steps` in `metrics.json` (for `dvc metrics` and progress displays), in `out_dir` and at
    the `live` stem. Every row rewrites the files atomically, so a reader never sees half a row.
    A resumed run keeps the rows up to its starting step and drops later ones (logged after
    that checkpoint, to be logged again), so no row is lost or repeated. With `live_only`, the
    run folder's files are read, not rewritten: a run that trains nothing shows the rows up to its
    step and keeps the later ones of the folder for a run that goes on past it; `row` is the row
    its checkpoint holds, shown as it was logged when the folder's json has moved on."""

    def __init__(self, out_dir: Path, start_step: int, max_steps: int, live: str = "", live_only: bool = False,
                 row: dict[str, Any] | None = None):
        self.stems = [*([] if live_only else [out_dir / "metrics"]), *([Path(live)] if live else [])]
        self.max_steps = max_steps
        tsv, latest_json = out_dir / "metrics.tsv", out_dir / "metrics.json"
        self.rows: list[str] = []
        if start_step > 0 and tsv.is_file():
            lines = tsv.read_text().splitlines()[1:]
            self.rows = [line for line in lines if int(line.split("\t")[0]) <= start_step]
        self.latest: dict[str, Any] | None = None
        if self.rows:
            saved = json.loads(latest_json.read_text()) if latest_json.is_file() else {}
            logged_step = int(self.rows[-1].split("\t")[0])
            logged = [values for values in (saved, row or {}) if values.get("step") == logged_step]
            self.latest = logged[0] if logged else _parse_row(self.rows[-1])
        self._publish()

    def write(self, row: dict[str, float]) -> None:
        self.rows.append("\t".join(_format(row[c]) for c in METRIC_COLUMNS))
        self.latest = dict(row)
        self._publish()

    def _publish(self) -> None:
        table = "\n".join(["\t".join(METRIC_COLUMNS), *self.rows]) + "\n"
        latest = None if self.latest is None else {**self.latest, "max_steps": self.max_steps}
        for stem in self.stems:
            stem.parent.mkdir(parents=True, exist_ok=True)
            _replace_text(stem.with_name(stem.name + ".tsv"), table)
            if latest is not None:
                _replace_text(stem.with_name(stem.name + ".json"), json.dumps(latest, indent=2) + "\n")


def _replace_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _parse_row(line: str) -> dict[str, float]:
    """A tsv row back as numbers (the json of a row that a killed run overwrote)."""
    values = dict(zip(METRIC_COLUMNS, line.split("\t")))
    return {k: int(v) if k in ("step", "epoch", "skipped_steps") else float(v) for k, v in values.items()}


def _format(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


@dataclass
class LogWindow:
    """The steps since the last metrics row: loss and gradient-norm sums of the applied ones."""

    first_step: int
    start: float = field(default_factory=time.perf_counter)
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*LOSS_PARTS, "grad_norm"), 0.0))
    applied: int = 0

    def add(self, result: StepResult) -> None:
        for name, value in {**result.losses, "grad_norm": result.grad_norm}.items():
            self.sums[name] += value
        self.applied += 1

    def means(self) -> dict[str, float]:
        return {name: total / self.applied if self.applied else math.nan for name, total in self.sums.items()}
