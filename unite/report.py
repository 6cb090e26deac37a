"""Figures of a run and one self-contained HTML page about it, viewable offline.

The figures are PNGs drawn by matplotlib outside pyplot (no display, no global state): training curves
from the trainer's metrics table, the CFG sweep's metric against the guidance scale, and image
grids. The report embeds them as data URIs next to the params, the metrics and the provenance,
so the single file opens by a double click on a machine without network.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

# Image grids whose shorter side is below this are enlarged (nearest neighbour, integer factor),
# so that the demo's 16-pixel digits can be seen.
MIN_GRID_SIDE = 512
DPI = 100


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Rows of a tab-separated file with a header line."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _column(rows: Sequence[Mapping[str, str]], name: str, path: str | Path) -> list[float]:
    if rows and name not in rows[0]:
        raise ValueError(f"{path}: no column {name!r}; columns: {list(rows[0])}")
    return [float(row[name]) for row in rows]


def _axes() -> tuple[Figure, Any]:
    """A figure outside pyplot: no global state, no display, drawn by the Agg canvas."""
    figure = Figure(figsize=(6.4, 4.0), layout="tight")
    return figure, figure.subplots()


def _save(figure: Figure, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI, format="png")


def curve_figure(
    table: str | Path, columns: Mapping[str, str], out: str | Path, title: str, ylabel: str, log: bool = False
) -> None:
    """Columns of a training metrics table against `step`, one line each ({column: label})."""
    rows = read_table(table)
    if not rows:
        raise ValueError(f"{table}: no rows to plot")
    steps = _column(rows, "step", table)
    values = {column: _column(rows, column, table) for column in columns}
    figure, axes = _axes()
    for column, label in columns.items():
        axes.plot(steps, values[column], label=label, marker="." if len(rows) < 30 else None)
    if log and all(v > 0 for series in values.values() for v in series):  # a log axis needs positive values
        axes.set_yscale("log")
    axes.set(xlabel="step", ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    if len(columns) > 1:
        axes.legend()
    _save(figure, Path(out))


def cfg_figure(sweep_table: str | Path, metric: str, chosen: Mapping[str, Any], out: str | Path,
               name: str | None = None) -> None:
    """The sweep's metric against the CFG scale: one series per (CFG interval, normalisation order),
    the chosen setting circled; `name` names the metric on the axis and in the title."""
    figure, axes = _axes()
    for label, points in cfg_series(read_table(sweep_table), metric, sweep_table).items():
        scales, values = zip(*points)
        axes.plot(scales, values, marker="o", linestyle="-" if len(points) > 1 else "none", label=label)
    axes.scatter([chosen["scale"]], [chosen[metric]], s=200, facecolors="none", edgecolors="black",
                 linewidths=1.5, label="chosen", zorder=3)
    name = name or metric.replace("_", " ")
    axes.set(xlabel="CFG scale", ylabel=name, title=f"{name} vs CFG scale")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, Path(out))


def cfg_series(rows: Sequence[Mapping[str, str]], metric: str, source: str | Path = "sweep table"
               ) -> dict[str, list[tuple[float, float]]]:
    """{setting label: [(cfg scale, metric), ...] sorted by scale} of sweep rows, one series per
    (CFG interval, normalisation order) among the columns the rows have."""
    if not rows:
        raise ValueError(f"{source}: no rows to plot")
    for column in ("cfg_scale", metric):
        _column(rows, column, source)  # fails naming the columns there are
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        series.setdefault(setting_label(row), []).append((float(row["cfg_scale"]), float(row[metric])))
    return {label: sorted(points) for label, points in series.items()}


def setting_label(row: Mapping[str, str]) -> str:
    """'interval [low, high], norm_order' of a sweep row, from the columns it has."""
    parts = []
    if "interval_low" in row and "interval_high" in row:
        parts.append(f"interval [{float(row['interval_low']):g}, {float(row['interval_high']):g}]")
    if "norm_order" in row:
        parts.append(row["norm_order"])
    return ", ".join(parts) or "sweep"


def enlarged(image: Image.Image, min_side: int = MIN_GRID_SIDE) -> Image.Image:
    """The image scaled up by the smallest integer factor that makes its shorter side >= min_side
    (nearest neighbour: pixels stay sharp squares); unchanged when it is large enough."""
    factor = math.ceil(min_side / min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, columns: int = 8,
                        padding: int = 2) -> Image.Image:
    """[0, 1] (N, 3, H, W) images as rows of `columns` originals, each above a row of their
    reconstructions, on a white background; pairs of rows are `3 * padding` further apart."""
    if originals.shape != reconstructions.shape or originals.ndim != 4:
        raise ValueError(f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)}: "
                         "must be the same (N, 3, H, W) shape")
    count, channels, height, width = originals.shape
    columns = min(columns, count)
    pairs = math.ceil(count / columns)
    cell_h, cell_w = height + padding, width + padding
    pair_h = 2 * cell_h + 3 * padding
    canvas = torch.ones(channels, pairs * pair_h - 2 * padding, columns * cell_w + padding)
    for index in range(count):
        pair, column = divmod(index, columns)
        left = padding + column * cell_w
        for row, source in ((0, originals), (1, reconstructions)):
            top = padding + pair * pair_h + row * cell_h
            canvas[:, top : top + height, left : left + width] = source[index].clamp(0, 1)
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# The sample-quality scores of evaluate's generation section, in reading order, with what each measures.
QUALITY_METRICS = {
    "fid": "FID: Frechet distance of Inception pool features to the reference (lower is better)",
    "fd": "FD: Frechet distance in the run's feature space (not FID; lower is better)",
    "sfid": "sFID: Frechet distance of Inception's spatial mixed_6/conv features (lower is better)",
    "kid_mean": "KID: unbiased squared MMD of Inception pool features, mean over subsets (lower is better)",
    "kid_std": "KID: its std over subsets",
    "kd_mean": "KD: unbiased squared MMD in the run's feature space (not KID; lower is better)",
    "kd_std": "KD: its std over subsets",
    "precision": "precision: share of samples inside the reference manifold, k=3 (fidelity)",
    "recall": "recall: share of reference images inside the samples' manifold, k=3 (diversity)",
    "is_mean": "Inception Score (higher is better)",
    "class_consistency": "class consistency: a real-data classifier's accuracy on the samples",
}


def quality_table(generation: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of the sample-quality scores that evaluate reported, each with its meaning."""
    rows = [[key, generation[key], meaning] for key, meaning in QUALITY_METRICS.items() if key in generation]
    return ["metric", "value", "what it measures"], rows


def data_uri(path: str | Path) -> str:
    """A PNG file as a data: URI, so the page needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.6g}"
    elif not isinstance(value, str):
        value = json.dumps(value)
    return html.escape(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 0 2em; }
"""


def history_table(history: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The training runs that made the model, one row per segment of its checkpoint's history."""
    header = ["from step", "to step", "GPUs (world size)", "settings", "code version"]
    rows = [[segment["from_step"], segment["to_step"], segment["world_size"],
             ", ".join(f"{key}={value}" for key, value in segment["settings"].items()), segment["code_version"]]
            for segment in history]
    return header, rows


def render_report(
    title: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, Any]],
    figures: Mapping[str, str | Path],
    provenance: Mapping[str, Any],
    tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]] | None = None,
) -> str:
    """The report page: metrics (one table per source), extra tables ({caption: (header, rows)}),
    the figures ({caption: PNG path}) embedded as data URIs, params and provenance. It references
    no file and no URL."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.</p>", "<h2>Metrics</h2>",
             '<div class="grid">']
    for name, values in metrics.items():
        parts += [f"<div><h3>{html.escape(name)}</h3>", _table(["metric", "value"], flatten(values).items()), "</div>"]
    parts.append("</div>")
    for caption, (header, rows) in (tables or {}).items():
        parts += [f"<h3>{html.escape(caption)}</h3>", _table(header, rows)]
    parts.append("<h2>Figures</h2>")
    for caption, path in figures.items():
        parts.append(f'<figure><img src="{data_uri(path)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ["<h2>Params</h2>", _table(["param", "value"], flatten(params).items()),
              "<h2>Provenance</h2>", _table(["item", "value"], flatten(provenance).items())]
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
