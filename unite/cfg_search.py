"""Classifier-free guidance search and sweeps, as pure functions over an `evaluate` callback.

`evaluate(scale, interval, norm_order) -> fid` generates the images the search scores (by default
a budget of its own, separate from the reported evaluation set) and scores them; these functions
only decide which settings to try, so they are tested on synthetic FID curves.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from unite.options import NORM_ORDERS, check_choice, check_interval

Interval = tuple[float, float]
Evaluate = Callable[[float, Interval, str], float]

DEFAULT_START = 3.4
DEFAULT_INTERVAL: Interval = (0.1, 1.0)
DEFAULT_NORM_ORDER = "norm_first"
TSV_COLUMNS = ("index", "stage", "cfg_scale", "interval_low", "interval_high", "norm_order")


@dataclass(frozen=True)
class CfgPoint:
    """One evaluated setting; `value` is the metric (FID or KID, or the demo's FD or KD)."""

    scale: float
    interval: Interval
    norm_order: str
    value: float
    stage: str


@dataclass
class CfgResult:
    """The chosen (lowest-metric) setting and every point visited, in visiting order."""

    chosen: CfgPoint
    points: list[CfgPoint]
    metric: str = "fid"

    def to_dict(self) -> dict:
        """JSON-ready: {metric, chosen: {...}, points: [...]} with the metric under its own name."""

        def point(p: CfgPoint) -> dict:
            row = asdict(p)
            row["interval"] = list(p.interval)
            row[self.metric] = row.pop("value")
            return row

        return {"metric": self.metric, "chosen": point(self.chosen), "points": [point(p) for p in self.points]}

    def write(self, json_path: str | os.PathLike, tsv_path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write the JSON (with the entries of `extra` added, e.g. how the images were made) and a
        TSV (one row per point) that `dvc plots` can draw as metric vs cfg_scale."""
        for path in (json_path, tsv_path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({**self.to_dict(), **(extra or {})}, indent=2) + "\n")
        with open(tsv_path, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow((*TSV_COLUMNS, self.metric))
            for index, p in enumerate(self.points):
                writer.writerow((index, p.stage, p.scale, p.interval[0], p.interval[1], p.norm_order, p.value))


def _check_setting(interval: Interval, norm_order: str) -> None:
    check_interval("cfg interval", interval)
    check_choice("norm_order", norm_order, NORM_ORDERS)


def _score(evaluate: Evaluate, scale: float, interval: Interval, norm_order: str, stage: str) -> CfgPoint:
    value = float(evaluate(scale, interval, norm_order))
    if not math.isfinite(value):
        raise ValueError(
            f"evaluate(scale={scale}, interval={interval}, norm_order={norm_order!r}) returned {value}; "
            f"the metric must be a finite number"
        )
    return CfgPoint(scale, tuple(interval), norm_order, value, stage)


def adaptive_cfg_search(
    evaluate: Evaluate,
    start: float = DEFAULT_START,
    *,
    step: float = 0.2,
    max_extra_steps: int = 7,
    max_scale: float = 10.0,
    interval: Interval = DEFAULT_INTERVAL,
    norm_order: str = DEFAULT_NORM_ORDER,
    metric: str = "fid",
) -> CfgResult:
    """The spec's adaptive search: evaluate X = start and X - step; walk `step` at a time in the better
    direction (up when X - step is not strictly better) while the metric strictly improves, at most
    `max_extra_steps` more evaluations, scales within (0, max_scale]."""
    if not 0 < start <= max_scale:
        raise ValueError(f"start={start}: the CFG scale must lie in (0, {max_scale}]")
    if step <= 0 or max_extra_steps < 0:
        raise ValueError(f"step={step}, max_extra_steps={max_extra_steps}: need step > 0 and max_extra_steps >= 0")
    _check_setting(interval, norm_order)

    def scale_at(k: int) -> float:
        return round(start + k * step, 6)

    def visit(k: int) -> CfgPoint:
        point = _score(evaluate, scale_at(k), interval, norm_order, "search")
        points.append(point)
        return point

    points: list[CfgPoint] = []
    best, position, direction = visit(0), 0, 1
    if scale_at(-1) > 0:
        lower = visit(-1)
        if lower.value < best.value:
            best, position, direction = lower, -1, -1
    for _ in range(max_extra_steps):
        candidate = position + direction
        if not 0 < scale_at(candidate) <= max_scale:
            break
        point = visit(candidate)
        if not point.value < best.value:
            break
        best, position = point, candidate
    return CfgResult(best, points, metric)


def cfg_points(
    evaluate: Evaluate,
    settings: Sequence[tuple[float, Interval, str]],
    *,
    known: Iterable[CfgPoint] = (),
    metric: str = "fid",
    stage: str = "sweep",
) -> CfgResult:
    """Each (scale, interval, norm order) of `settings`, in the given order; settings already in
    `known` (e.g. the search's points) are reused, not evaluated again."""
    if not settings:
        raise ValueError("sweep: no settings to evaluate")
    for scale, interval, norm_order in settings:
        if not scale > 0:
            raise ValueError(f"sweep scale={scale}: CFG scales must be > 0")
        _check_setting(interval, norm_order)
    done = {(p.scale, tuple(p.interval), p.norm_order): p for p in known}
    points = []
    for scale, interval, norm_order in settings:
        key = (scale, tuple(interval), norm_order)
        points.append(done[key] if key in done else _score(evaluate, scale, interval, norm_order, stage))
    return CfgResult(min(points, key=lambda p: p.value), points, metric)


def cfg_sweep(
    evaluate: Evaluate,
    scales: Sequence[float],
    intervals: Sequence[Interval] = (DEFAULT_INTERVAL,),
    norm_orders: Sequence[str] = (DEFAULT_NORM_ORDER,),
    *,
    known: Iterable[CfgPoint] = (),
    metric: str = "fid",
) -> CfgResult:
    """Every scale x interval x norm order (norm order outermost, scale innermost); settings already
    in `known` (e.g. the search's points) are reused, not evaluated again."""
    if not scales or not intervals or not norm_orders:
        raise ValueError(f"sweep: scales={scales}, intervals={intervals}, norm_orders={norm_orders}; none may be empty")
    settings = [(s, i, n) for n in norm_orders for i in intervals for s in scales]
    return cfg_points(evaluate, settings, known=known, metric=metric)


def wide_sweep(
    evaluate: Evaluate,
    search: CfgResult,
    settings: Sequence[tuple[str, Interval]],
    *,
    may_change_choice: bool = False,
) -> CfgResult:
    """The reference's periodic wider sweep: each (norm order, interval) of `settings` at the scale
    the search chose. Its points are reported after the search's; as in the reference they never
    change the chosen setting unless `may_change_choice` (then a strictly better point wins)."""
    wide = cfg_points(evaluate, [(search.chosen.scale, tuple(i), n) for n, i in settings], known=search.points,
                      metric=search.metric)
    points = search.points + [p for p in wide.points if p not in search.points]
    chosen = search.chosen
    if may_change_choice and wide.chosen.value < chosen.value:
        chosen = wide.chosen
    return CfgResult(chosen, points, search.metric)
