"""Adaptive CFG search and sweeps on synthetic FID curves: the exact points visited."""

from __future__ import annotations

import csv
import json

import pytest

from unite.cfg_search import CfgPoint, adaptive_cfg_search, cfg_points, cfg_sweep, wide_sweep


class Curve:
    """A synthetic FID curve that records every setting it is asked about."""

    def __init__(self, fid):
        self.fid = fid
        self.calls = []

    def __call__(self, scale, interval, norm_order):
        self.calls.append((scale, interval, norm_order))
        return self.fid(scale)


def visited(result):
    return [p.scale for p in result.points]


def test_search_walks_down_while_fid_improves_and_stops_at_first_worse():
    curve = Curve(lambda s: (s - 2.6) ** 2)
    result = adaptive_cfg_search(curve)
    assert visited(result) == [3.4, 3.2, 3.0, 2.8, 2.6, 2.4]
    assert result.chosen.scale == 2.6
    assert [c[0] for c in curve.calls] == visited(result)
    assert all(c[1:] == ((0.1, 1.0), "norm_first") for c in curve.calls)


def test_search_walks_up_when_the_lower_scale_is_worse():
    curve = Curve(lambda s: (s - 4.25) ** 2)
    result = adaptive_cfg_search(curve)
    assert visited(result) == [3.4, 3.2, 3.6, 3.8, 4.0, 4.2, 4.4]
    assert result.chosen.scale == 4.2


def test_search_takes_at_most_seven_more_steps():
    result = adaptive_cfg_search(Curve(lambda s: s))  # keeps improving downwards
    assert visited(result) == [3.4, 3.2, 3.0, 2.8, 2.6, 2.4, 2.2, 2.0, 1.8]
    assert result.chosen.scale == 1.8


def test_search_requires_strict_improvement():
    result = adaptive_cfg_search(Curve(lambda s: 5.0), start=3.0)
    assert visited(result) == [3.0, 2.8, 3.2]
    assert result.chosen.scale == 3.0


def test_search_stays_within_zero_and_ten():
    up = adaptive_cfg_search(Curve(lambda s: -s), start=9.8)
    assert visited(up) == [9.8, 9.6, 10.0]
    assert up.chosen.scale == 10.0
    low = adaptive_cfg_search(Curve(lambda s: s), start=0.2)  # 0.0 is outside (0, 10]
    assert visited(low) == [0.2, 0.4]
    assert low.chosen.scale == 0.2


def test_search_passes_its_interval_and_norm_order():
    curve = Curve(lambda s: abs(s - 3.4))
    adaptive_cfg_search(curve, start=3.4, interval=(0.0, 1.0), norm_order="both")
    assert {c[1:] for c in curve.calls} == {((0.0, 1.0), "both")}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(start=0.0), r"start=0.0: the CFG scale must lie in \(0, 10.0\]"),
        (dict(start=10.5), r"start=10.5"),
        (dict(interval=(0.5, 0.2)), r"cfg interval=\(0.5, 0.2\): must be"),
        (dict(norm_order="ln_last"), r"norm_order='ln_last': must be one of \['norm_first', 'cfg_first', 'both'\]"),
    ],
)
def test_search_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adaptive_cfg_search(Curve(lambda s: s), **kwargs)


def test_search_rejects_a_non_finite_fid():
    with pytest.raises(ValueError, match=r"evaluate\(scale=3.2, .*\) returned nan"):
        adaptive_cfg_search(Curve(lambda s: float("nan") if s < 3.3 else 1.0))


def test_sweep_visits_the_full_grid_and_reuses_known_points():
    curve = Curve(lambda s: 0.0)
    grid_fid = {}

    def evaluate(scale, interval, norm_order):
        curve(scale, interval, norm_order)
        return grid_fid.setdefault((scale, interval, norm_order), 10 - scale + interval[0] + len(norm_order))

    known = [CfgPoint(3.0, (0.1, 1.0), "norm_first", 1.5, "search")]
    result = cfg_sweep(evaluate, [3.0, 3.5], [(0.1, 1.0), (0.0, 1.0)], ["norm_first", "both"], known=known)
    expected = [(n, i, s) for n in ["norm_first", "both"] for i in [(0.1, 1.0), (0.0, 1.0)] for s in [3.0, 3.5]]
    assert [(p.norm_order, p.interval, p.scale) for p in result.points] == expected
    assert len(curve.calls) == 7  # the known point is not evaluated again
    assert result.points[0] is known[0]
    assert result.chosen is known[0]  # 1.5 beats every computed value (>= 10 - 3.5 + 4)


def test_results_write_json_and_a_dvc_plots_tsv(tmp_path):
    result = adaptive_cfg_search(Curve(lambda s: (s - 2.6) ** 2))
    result.write(tmp_path / "cfg.json", tmp_path / "cfg.tsv")
    data = json.loads((tmp_path / "cfg.json").read_text())
    assert data["chosen"] == {"scale": 2.6, "interval": [0.1, 1.0], "norm_order": "norm_first",
                              "fid": pytest.approx(0.0), "stage": "search"}
    assert [p["scale"] for p in data["points"]] == visited(result)
    with open(tmp_path / "cfg.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [float(r["cfg_scale"]) for r in rows] == visited(result)
    assert [float(r["fid"]) for r in rows] == pytest.approx([(s - 2.6) ** 2 for s in visited(result)])
    assert rows[0]["norm_order"] == "norm_first" and rows[0]["interval_low"] == "0.1"


def test_points_are_evaluated_in_the_given_order_reusing_known_ones():
    curve = Curve(lambda s: s)
    known = [CfgPoint(2.0, (0.1, 1.0), "norm_first", 0.5, "search")]
    settings = [(2.0, (0.0, 1.0), "norm_first"), (2.0, (0.1, 1.0), "norm_first"), (2.0, (0.1, 1.0), "cfg_first")]
    result = cfg_points(curve, settings, known=known)
    assert [(p.scale, p.interval, p.norm_order) for p in result.points] == settings
    assert curve.calls == [settings[0], settings[2]]
    assert result.points[1] is known[0]


def wide_curve(scale, interval, norm_order):
    # The search's setting scores (scale - 2.5)^2; each wide setting a fixed, lower value.
    wide = {((0.0, 1.0), "norm_first"): 0.01, ((0.1, 1.0), "cfg_first"): 0.02}
    return wide.get((tuple(interval), norm_order), (scale - 2.5) ** 2 + 1.0)


REFERENCE_WIDE = [("norm_first", (0.0, 1.0)), ("norm_first", (0.05, 1.0)), ("norm_first", (0.15, 1.0)),
                  ("norm_first", (0.2, 1.0)), ("cfg_first", (0.1, 1.0))]


def test_wide_points_are_reported_at_the_chosen_scale_and_never_chosen():
    search = adaptive_cfg_search(wide_curve, start=3.0, step=0.25)
    assert search.chosen.scale == 2.5
    result = wide_sweep(wide_curve, search, REFERENCE_WIDE)
    assert result.chosen == search.chosen  # 0.01 is better, yet the search's setting stays
    wide = result.points[len(search.points):]
    assert result.points[: len(search.points)] == search.points
    assert [(p.norm_order, p.interval) for p in wide] == REFERENCE_WIDE
    assert all(p.scale == 2.5 and p.stage == "sweep" for p in wide)


def test_wide_points_may_change_the_choice_when_asked():
    search = adaptive_cfg_search(wide_curve, start=3.0, step=0.25)
    result = wide_sweep(wide_curve, search, REFERENCE_WIDE, may_change_choice=True)
    assert (result.chosen.scale, result.chosen.interval, result.chosen.norm_order) == (2.5, (0.0, 1.0), "norm_first")
