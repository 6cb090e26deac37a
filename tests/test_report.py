"""The run report's pieces (figures, grids, provenance, the self-contained page) and the offline
`dvc plots` page template. The report stage itself runs in tests/test_pipeline.py."""

from __future__ import annotations

import base64
import configparser
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from offline_page import PageReferences, network_urls
from stages import plots_page
from unite.cfg_search import CfgPoint, CfgResult
from unite.evaluation import search_metric_name
from unite.provenance import git_state, params_hash
import unite.report
from unite.report import (cfg_figure, cfg_series, curve_figure, enlarged, quality_table, read_table, reconstruction_grid,
                          render_report)

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_train_table(path: Path, rows: list[dict[str, float]]) -> None:
    header = list(rows[0])
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(str(r[h]) for h in header) + "\n" for r in rows))


def test_enlarged_repeats_each_pixel_as_a_square_and_leaves_large_images_alone():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 16, 3), dtype=np.uint8)
    big = enlarged(Image.fromarray(pixels), min_side=64)
    assert big.size == (16 * 4, 20 * 4)  # the shorter side 16 needs a factor of 4
    assert np.array_equal(np.asarray(big), pixels.repeat(4, axis=0).repeat(4, axis=1))
    large = Image.fromarray(np.zeros((600, 700, 3), np.uint8))
    assert enlarged(large, min_side=512).size == (700, 600)


def test_reconstruction_grid_puts_each_original_above_its_reconstruction():
    count, size, pad = 5, 4, 2
    originals = torch.arange(count).float().div(10).view(count, 1, 1, 1).expand(count, 3, size, size)
    reconstructions = 1 - originals
    grid = np.asarray(reconstruction_grid(originals, reconstructions, columns=3, padding=pad))
    # 2 pairs of rows (3 + 2 images), 3 columns, padding around every cell, 3 paddings more between pairs.
    assert grid.shape == (4 * (size + pad) + pad + 3 * pad, 3 * (size + pad) + pad, 3)
    for index in range(count):
        pair, column = divmod(index, 3)
        left = pad + column * (size + pad)
        top = pad + pair * (2 * (size + pad) + 3 * pad)
        original = grid[top : top + size, left : left + size]
        below = grid[top + size + pad : top + 2 * size + pad, left : left + size]
        assert (original == round(index / 10 * 255)).all(), index
        assert (below == round((1 - index / 10) * 255)).all(), index
    assert (grid[:pad] == 255).all() and (grid[:, :pad] == 255).all()  # white padding
    assert (grid[-(size + 2 * pad):, -(size + 2 * pad):] == 255).all()  # no sixth image


def test_reconstruction_grid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"originals \(2, 3, 4, 4\) and reconstructions \(3, 3, 4, 4\)"):
        reconstruction_grid(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4))


def test_cfg_series_splits_the_sweep_by_interval_and_norm_order(tmp_path, monkeypatch):
    # The table as the sweep stage writes it: a search along the scale, then a wider sweep.
    points = [CfgPoint(2.0, (0.1, 1.0), "norm_first", 0.5, "search"),
              CfgPoint(1.75, (0.1, 1.0), "norm_first", 0.4, "search"),
              CfgPoint(1.5, (0.1, 1.0), "norm_first", 0.45, "search"),
              CfgPoint(1.75, (0.0, 1.0), "norm_first", 0.42, "sweep"),
              CfgPoint(1.75, (0.1, 1.0), "cfg_first", 0.41, "sweep")]
    CfgResult(points[1], points, "frechet_distance").write(tmp_path / "sweep.json", tmp_path / "sweep.tsv")
    series = cfg_series(read_table(tmp_path / "sweep.tsv"), "frechet_distance")
    assert series == {
        "interval [0.1, 1], norm_first": [(1.5, 0.45), (1.75, 0.4), (2.0, 0.5)],
        "interval [0, 1], norm_first": [(1.75, 0.42)],
        "interval [0.1, 1], cfg_first": [(1.75, 0.41)],
    }
    # Without the setting columns everything is one series.
    assert cfg_series([{"cfg_scale": "2", "fid": "3"}, {"cfg_scale": "1", "fid": "4"}], "fid") == {
        "sweep": [(1.0, 4.0), (2.0, 3.0)]}
    out = tmp_path / "cfg.png"
    saved, original_save = [], unite.report._save
    monkeypatch.setattr(unite.report, "_save", lambda figure, path: saved.append(figure) or original_save(figure, path))
    cfg_figure(tmp_path / "sweep.tsv", "frechet_distance", {"scale": 1.75, "frechet_distance": 0.4}, out,
               "Frechet distance in pixel features")
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    axes = saved[0].axes[0]  # the metric is named, whatever the series are called
    assert axes.get_title() == "Frechet distance in pixel features vs CFG scale"
    assert axes.get_ylabel() == "Frechet distance in pixel features"


@pytest.mark.parametrize("space, name", [("pixel-8x8", "kernel distance in pixel features"),
                                         ("inception-v3-compat", "KID")])
def test_the_cfg_figure_of_a_search_by_kid_draws_and_names_kid(tmp_path, monkeypatch, space, name):
    points = [CfgPoint(2.0, (0.1, 1.0), "norm_first", 0.03, "search"),
              CfgPoint(1.5, (0.1, 1.0), "norm_first", 0.01, "search")]
    CfgResult(points[1], points, "kernel_distance").write(tmp_path / "sweep.json", tmp_path / "sweep.tsv")
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    saved, original_save = [], unite.report._save
    monkeypatch.setattr(unite.report, "_save", lambda figure, path: saved.append(figure) or original_save(figure, path))
    metric = search_metric_name(sweep["metric"], space)  # as the report stage names it
    cfg_figure(tmp_path / "sweep.tsv", sweep["metric"], sweep["chosen"], tmp_path / "cfg.png", metric)
    axes = saved[0].axes[0]
    assert (axes.get_title(), axes.get_ylabel()) == (f"{name} vs CFG scale", name)
    assert axes.lines[0].get_xydata().tolist() == [[1.5, 0.01], [2.0, 0.03]]
    assert axes.collections[0].get_offsets().tolist() == [[1.5, 0.01]]  # the chosen point, circled


def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path):
    table = tmp_path / "train.tsv"
    write_train_table(table, [{"step": 1, "loss": 2.0}])
    with pytest.raises(ValueError, match=r"train.tsv: no column 'flow'; columns: \['step', 'loss'\]"):
        curve_figure(table, {"loss": "total", "flow": "flow"}, tmp_path / "out.png", "t", "loss")
    with pytest.raises(ValueError, match=r"sweep.tsv: no column 'fid'"):
        cfg_series([{"cfg_scale": "1", "frechet_distance": "2"}], "fid", "sweep.tsv")


def test_curve_figure_writes_a_png_of_the_requested_size(tmp_path):
    table = tmp_path / "train.tsv"
    write_train_table(table, [{"step": s, "loss": 1 / s, "recon": 0.5 / s, "flow": 0.5} for s in range(1, 50)])
    out = tmp_path / "figures" / "loss.png"
    curve_figure(table, {"loss": "total", "recon": "reconstruction", "flow": "flow"}, out, "Losses", "loss", log=True)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (640, 400)


def test_params_hash_ignores_layout_and_follows_values():
    layout_a = yaml.safe_load("train:\n  lr: 0.1   # comment\n  steps: 3\nsweep: {seed: 1}\n")
    layout_b = yaml.safe_load("sweep:\n  seed: 1\ntrain: {steps: 3, lr: 0.1}\n")
    assert params_hash(layout_a) == params_hash(layout_b)
    assert params_hash(layout_a) != params_hash({**layout_a, "sweep": {"seed": 2}})


def test_git_state_names_the_commit_and_marks_uncommitted_changes(tmp_path):
    assert git_state(tmp_path) == "unknown"

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "file.txt").write_text("a")
    git("add", "file.txt")
    git("commit", "-qm", "one")
    commit = git("rev-parse", "HEAD")
    assert git_state(tmp_path) == commit
    (tmp_path / "file.txt").write_text("b")
    assert git_state(tmp_path) == f"{commit} (with uncommitted changes)"


def test_report_embeds_figures_and_escapes_values(tmp_path):
    figure = tmp_path / "grid.png"
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(figure)
    page = render_report(
        "Run <1>",
        {"train": {"base_lr": 0.002, "note": "<script>alert(1)</script>"}},
        {"evaluate": {"generation": {"frechet_distance": 0.25}}},
        {"Samples": figure},
        {"git commit": "abc123", "packages": {"torch": "2.14.1"}},
        tables={"CFG sweep points": (["cfg_scale", "fid"], [["1.5", "0.3"]]),
                "Sample quality": quality_table({"fd": 0.25, "kd_mean": 0.125, "num_images": 3})},
    )
    assert network_urls(page) == []
    (image,) = PageReferences(page).attributes
    assert image.startswith("data:image/png;base64,")
    assert base64.b64decode(image.split(",", 1)[1]) == figure.read_bytes()
    for text in ("Run &lt;1&gt;", "train.base_lr", "0.002", "generation.frechet_distance", "0.25",
                 "packages.torch", "2.14.1", "abc123", "CFG sweep points", "&lt;script&gt;alert(1)&lt;/script&gt;",
                 "<td>kd_mean</td><td>0.125</td><td>KD: unbiased squared MMD"):
        assert text in page, text
    assert "<script" not in page


# One page per way of loading from the network, each with the URL it loads.
NETWORK_PAGES = {
    '<img src="https://cdn.example/a.png">': "https://cdn.example/a.png",
    '<img srcset="a.png 1x, //cdn.example/b.png 2x">': "//cdn.example/b.png",
    '<link rel="stylesheet" href="http://cdn.example/a.css">': "http://cdn.example/a.css",
    '<object data="https://cdn.example/a.svg"></object>': "https://cdn.example/a.svg",
    '<meta http-equiv="refresh" content="0; url=https://cdn.example/">': "https://cdn.example/",
    '<script src="//cdn.example/vega.js"></script>': "//cdn.example/vega.js",
    '<script>fetch("https://cdn.example/data.json").then(r => r.json())</script>': "https://cdn.example/data.json",
    "<script type=module>import embed from 'https://esm.example/vega-embed';</script>": "https://esm.example/vega-embed",
    "<script>vegaEmbed('#vis', {data: {url: `//cdn.example/rows.csv`}})</script>": "//cdn.example/rows.csv",
    "<style>body { background: url(https://cdn.example/bg.png) }</style>": "https://cdn.example/bg.png",
    '<style>@import "https://fonts.example/css";</style>': "https://fonts.example/css",
    "<style>@import url('//fonts.example/x.css');</style>": "//fonts.example/x.css",
    '<div style="background-image: url(\'https://cdn.example/tile.png\')"></div>': "https://cdn.example/tile.png",
}


@pytest.mark.parametrize("page", NETWORK_PAGES)
def test_the_offline_check_finds_every_way_a_page_loads_from_the_network(page):
    assert network_urls(f"<html><body>{page}</body></html>") == [NETWORK_PAGES[page]]


def test_the_offline_check_passes_local_and_inline_resources():
    page = """<html><head><style>.a { background: url(data:image/png;base64,AAAA) } @import "local.css";</style>
    <script>// a comment: https://example.com in a comment is no load
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "g"); const x = 10 // 2;</script></head>
    <body><img src="figures/a.png" srcset="a.png 1x, b.png 2x"><a href="#top">top</a>
    <div style="background: url('tile.png')"></div></body></html>"""
    assert network_urls(page) == []
    assert PageReferences(page).attributes == ["figures/a.png", "a.png", "b.png", "#top"]


def test_plots_page_template_inlines_the_plotting_libraries():
    page = plots_page.render()
    assert page.count("{plot_divs}") == 1 and "{refresh_tag}" in page
    assert "{scripts}" not in page  # DVC's CDN script tags go there
    assert network_urls(page) == []
    # The inline bundle defines what DVC's plot scripts call.
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    assert "window.vegaEmbed=" in script and len(script) > 100_000


def test_dvc_config_points_at_a_committed_offline_template():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    template = ROOT / ".dvc" / config["plots"]["html_template"]
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(template)], cwd=ROOT, capture_output=True)
    assert tracked.returncode == 0, f"{template} is not tracked by git"
    page = template.read_text()
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
    assert network_urls(page) == []
    assert "window.vegaEmbed=" in page


def test_the_prefect_summary_links_the_report_and_shows_its_grid_small(tmp_path):
    from flows.summary import PREVIEW_SIDE, _report_section

    assert "not found" in "\n".join(_report_section(tmp_path))
    (tmp_path / "reports" / "figures").mkdir(parents=True)
    (tmp_path / "reports" / "report.html").write_text("<html></html>")
    Image.fromarray(np.zeros((640, 1280, 3), np.uint8)).save(tmp_path / "reports" / "figures" / "samples.png")
    section = "\n".join(_report_section(tmp_path))
    assert f"({(tmp_path / 'reports' / 'report.html').as_uri()})" in section
    encoded = section.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as preview:
        assert preview.format == "PNG" and preview.size == (PREVIEW_SIDE, PREVIEW_SIDE // 2)
