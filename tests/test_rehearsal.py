"""Every preset in presets/ rehearsed end to end through the user's command, `python -m stages.rehearse`:
the preset applied with `python -m stages.preset`, sizes shrunk, `dvc repro` on a JPEG ImageNet-layout
folder with JiT-format statistics and random stand-in weights, two torchrun ranks."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.preset import load_preset
from stages.rehearse import copy_repository, shrunk_sizes

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
pytestmark = pytest.mark.slow


# A workspace where the pipeline has run (what `scripts/demo` leaves): outputs, the lock and the
# persistent checkpoint folder, none of them tracked by git.
RUN_OUTPUTS = ("dvc.lock", "data/raw/train/0/0.png", "data/shards/train/index.json", "checkpoints/0a1b/step_1.pt",
               "models/final.pt", "metrics/eval.json", "samples/grid.png", "reports/report.html")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of this repository with a run's outputs in it, from which the rehearsals start."""
    path = tmp_path_factory.mktemp("workspace") / "repo"
    path.mkdir()
    copy_repository(path)
    for name in RUN_OUTPUTS:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(name.encode())
    return path


def workspace_state(root: Path) -> dict[str, str]:
    """The sha256 of every file of the workspace but git's own."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file() and ".git" not in path.relative_to(root).parts
            and "__pycache__" not in path.parts}


def size_keys() -> set[str]:
    sizes = shrunk_sizes(2, 48)
    keys = {f"{section}.{key}" for section, values in sizes.items() for key in values}
    return (keys | {f"train.model.{key}" for key in sizes["train"]["model"]}
            | {"train.schedule.images_per_epoch", "sweep.wide"})


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("preset", PRESETS)
def test_rehearsal_runs_every_stage_of_the_preset(preset: str, workspace: Path, tmp_path: Path) -> None:
    before = workspace_state(workspace)
    assert set(RUN_OUTPUTS) < set(before)
    result = subprocess.run([sys.executable, "-m", "stages.rehearse", preset, "--keep", str(tmp_path / "keep")],
                            cwd=workspace, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    # The workspace's params, lock, data, checkpoints and every other file are untouched.
    assert workspace_state(workspace) == before, output[-6000:]
    assert result.returncode == 0, output[-6000:]
    repo = tmp_path / "keep" / preset / "repo"
    for stage in ["manifest", "shard", "fid_ref", "train", "export", "sweep", "evaluate"]:
        assert f"Running stage '{stage}'" in output, stage

    # Only sizes changed: every other key of the preset reached params.yaml as the preset gives it.
    params = flatten(yaml.safe_load((repo / "params.yaml").read_text()))
    expected = flatten(load_preset(ROOT / "presets" / f"{preset}.yaml"))
    shrunk = size_keys()
    kept = {k: v for k, v in expected.items() if k not in shrunk and not isinstance(v, dict)}
    assert {k: params[k] for k in kept} == kept
    assert params["train.nproc_per_node"] == params["sweep.nproc_per_node"] == params["evaluate.nproc_per_node"] == 2

    # JPEG source, JiT-format statistics (mu and sigma only), Inception FID, LPIPS in training and evaluation.
    assert len(list((repo / "data" / "imagenet" / "train").rglob("*.JPEG"))) == 48
    with np.load(repo / params["fid_ref.stats"]) as stats:
        assert sorted(stats.files) == ["mu", "sigma"]
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert train["step"] == params["train.max_steps"] and train["lpips"] > 0
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    generation, reconstruction = evaluation["generation"], evaluation["reconstruction"]
    assert generation["feature_space"] == "inception-v3-compat" and generation["num_images"] == 16
    assert all(math.isfinite(generation[key]) for key in ("fid", "is_mean", "is_std"))
    # The ADM suite beside FID: sFID from the spatial statistics of the first fid_ref.set_images train
    # images (JiT's file has none), KID and precision/recall against their features.
    assert generation["num_ref_features"] == 16
    assert all(math.isfinite(generation[key]) for key in ("sfid", "kid_mean", "kid_std"))
    # Precision is a share of the samples, recall a share of the reference features.
    for share, count in (("precision", generation["num_images"]), ("recall", generation["num_ref_features"])):
        assert generation[share] * count == round(generation[share] * count), share
    assert reconstruction["num_images"] == 8 and reconstruction["lpips"] > 0 and math.isfinite(reconstruction["rfid"])
    # The stand-in weights are never mistaken for the real ones.
    assert generation["weights"].startswith("NOT the official weights")
    assert reconstruction["lpips_weights"].startswith("NOT the official weights")
    sweep = json.loads((repo / "metrics" / "sweep.json").read_text())
    # The wider sweep: the preset's first point of each normalisation order, after the search's points.
    wide = [point for point in expected["sweep.wide"]
            if point is next(p for p in expected["sweep.wide"] if p["norm_order"] == point["norm_order"])]
    assert params["sweep.wide"] == wide and {p["norm_order"] for p in wide} == {"norm_first", "cfg_first"}
    assert [(p["stage"], p["norm_order"], p["interval"]) for p in sweep["points"] if p["stage"] == "sweep"] == \
        [("sweep", p["norm_order"], p["interval"]) for p in wide]
    searched = [point for point in sweep["points"] if point["stage"] != "sweep"]
    assert sweep["chosen"] == min(searched, key=lambda point: point["frechet_distance"])


def test_gpu_check_refuses_without_cuda() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert "benchmarks.gpu_check: no CUDA GPU here" in result.stderr and "stages.rehearse --all" in result.stderr
