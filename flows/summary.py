"""What a flow run shows in the Prefect UI: the training progress, the metrics table and the summary.

While the train stage runs, `unite-train-progress` shows step / max steps, loss and images/s from
the stage's metrics file in dvc.yaml (the trainer rewrites it at every log interval). After the
stages: a markdown summary (`unite-summary`: plan, what each stage did, params, experiment, metrics,
sample-grid paths) and a table of `dvc metrics show --json` (`unite-metrics`). Image artifacts only
render public URLs, so grids (image files among the planned stages' outputs) are published as paths
on the host that ran the flow. The summary also links reports/report.html and shows the report's
sample grid small, as a data: URI.
"""

import base64
import io
import json
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.dvc_commands import PlannedStage, StageResult

SUMMARY_KEY = "unite-summary"
METRICS_KEY = "unite-metrics"
PROGRESS_KEY = "unite-train-progress"
PROGRESS_EVERY_S = 5.0
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg"})
MAX_IMAGES_PER_OUT = 20
REPORT = Path("reports/report.html")
REPORT_GRID = Path("reports/figures/samples.png")
PREVIEW_SIDE = 480


class TrainProgress:
    """The `unite-train-progress` artifact: step / max steps, loss and images/s of the train stage,
    read from its metrics file whenever that changed, at most every PROGRESS_EVERY_S."""

    def __init__(self, root: Path, metrics: str) -> None:
        self.metrics, self.params = root / metrics, root / "params.yaml"
        self.seen = self._mtime()
        self.next_s = 0.0
        self.artifact = create_progress_artifact(0.0, key=PROGRESS_KEY, description="training: no step logged yet")

    def _mtime(self) -> int | None:
        try:
            return self.metrics.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if now < self.next_s and not force:
            return
        self.next_s = now + PROGRESS_EVERY_S
        mtime = self._mtime()
        if mtime is None or mtime == self.seen:
            return
        try:
            row = json.loads(self.metrics.read_text())
            max_steps = row.get("max_steps") or yaml.safe_load(self.params.read_text())["train"]["max_steps"]
            step = row["step"]
        except (OSError, ValueError, KeyError, TypeError):  # mid-write or not a training row yet
            return
        self.seen = mtime
        update_progress_artifact(
            self.artifact, min(100.0, 100.0 * step / max_steps),
            description=f"training: step {step} / {max_steps}, loss {row.get('loss', float('nan')):.4g}, "
                        f"{row.get('images_per_s', float('nan')):.1f} images/s",
        )


def _grids(root: Path, plan: Sequence[PlannedStage]) -> list[tuple[str, str]]:
    """(stage, path) of the image files among the planned stages' outputs, capped per output."""
    found: list[tuple[str, str]] = []
    for stage in plan:
        for out in stage.outs:
            path = root / out
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            found += [(stage.name, str(p.relative_to(root))) for p in images[:MAX_IMAGES_PER_OUT]]
            if len(images) > MAX_IMAGES_PER_OUT:
                found.append((stage.name, f"{out}/ ({len(images) - MAX_IMAGES_PER_OUT} more images)"))
    return found


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _report_section(root: Path) -> list[str]:
    """A link to the run's self-contained report and a small copy of its sample grid, inline as a
    data: URI (the UI renders those; it cannot show paths on the host)."""
    report = root / REPORT
    if not report.is_file():
        return ["## Report", f"`{REPORT}` not found (no report stage ran)."]
    parts = ["## Report", f"[{report}]({report.as_uri()}): one self-contained page; open it on the host above "
             "(browsers do not follow file links from a web page: copy the path)."]
    if (root / REPORT_GRID).is_file():
        with Image.open(root / REPORT_GRID) as grid:
            grid.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
            png = io.BytesIO()
            grid.save(png, format="PNG")
        parts.append(f"![sample grid](data:image/png;base64,{base64.b64encode(png.getvalue()).decode()})")
    return parts


def publish_metrics(root: Path, metrics: Mapping[str, Mapping[str, Any]]) -> None:
    """The `unite-metrics` table artifact: one row per file and metric."""
    rows = [{"file": f, "metric": k, "value": v} for f, values in metrics.items() for k, v in values.items()]
    create_table_artifact(rows, key=METRICS_KEY, description=f"dvc metrics show, {root}")


def publish_summary(
    title: str,
    root: Path,
    plan: Sequence[PlannedStage],
    results: Sequence[StageResult],
    target: str | None,
    overrides: Sequence[str],
    exp_name: str | None,
    metrics: Mapping[str, Mapping[str, Any]],
    unreadable: Mapping[str, str],
) -> None:
    """The `unite-summary` markdown artifact: the run, its stages, metrics, grids and report."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                         text=True, check=False).stdout.strip() or "unknown"
    rows = [(f, k, v) for f, values in metrics.items() for k, v in values.items()]
    grids = _grids(root, plan)
    parts = [
        f"# {title}",
        f"- repository: `{root}` on `{socket.gethostname()}`, git `{rev}`",
        f"- target: `{target}` and its upstream stages" if target else "- target: all stages",
        f"- params: `{' '.join(overrides)}`, saved as DVC experiment `{exp_name}`"
        if overrides else "- params: the workspace's params files",
        "## Stages",
        _md_table(["stage", "result", "seconds"], [(r.name, r.outcome, r.seconds) for r in results]),
        "## Metrics",
        _md_table(["file", "metric", "value"], rows) if rows else "No metrics (top-level `metrics:` of dvc.yaml).",
        *[f"- `{f}` not readable: {msg}" for f, msg in unreadable.items()],
        "## Sample grids",
        "Paths relative to the repository on the host above.",
        _md_table(["stage", "path"], [(s, f"`{p}`") for s, p in grids]) if grids else "None found.",
        *_report_section(root),
    ]
    create_markdown_artifact("\n\n".join(parts), key=SUMMARY_KEY, description="pipeline run summary")
