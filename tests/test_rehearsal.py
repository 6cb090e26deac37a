"""Every preset in presets/ rehearsed end to end through the user's command, `python -m stages.rehearse`:
the preset applied with `python -m stages.preset`, sizes shrunk, `dvc repro` on a JPEG ImageNet-layout
folder with JiT-format statistics and random stand-in weights, two torchrun ranks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.preset import load_preset
from stages.rehearse import shrunk_sizes

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
pytestmark = pytest.mark.slow


def workspace_state() -> str:
    digest = hashlib.sha256()
    for name in ("params.yaml", "dvc.lock"):
        path = ROOT / name
        digest.update(path.read_bytes() if path.is_file() else b"absent")
    return digest.hexdigest()


def size_keys() -> set[str]:
    sizes = shrunk_sizes(2, 48)
    keys = {f"{section}.{key}" for section, values in sizes.items() for key in values}
    return keys | {f"train.model.{key}" for key in sizes["train"]["model"]} | {"train.schedule.images_per_epoch"}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("preset", PRESETS)
def test_rehearsal_runs_every_stage_of_the_preset(preset: str, tmp_path: Path) -> None:
    before = workspace_state()
    result = subprocess.run([sys.executable, "-m", "stages.rehearse", preset, "--keep", str(tmp_path / "keep")],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert workspace_state() == before  # the workspace's own params and lock are untouched
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
    assert generation["fid"] >= 0 and generation["is_mean"] >= 1
    # The ADM suite beside FID: sFID from the spatial statistics of the first fid_ref.set_images train
    # images (JiT's file has none), KID and precision/recall against their features.
    assert generation["num_ref_features"] == 16 and generation["sfid"] >= 0 and generation["kid_std"] >= 0
    assert 0 <= generation["precision"] <= 1 and 0 <= generation["recall"] <= 1
    assert reconstruction["num_images"] == 8 and reconstruction["lpips"] > 0 and reconstruction["rfid"] >= 0
    # The stand-in weights are never mistaken for the real ones.
    assert generation["weights"].startswith("NOT the official weights")
    assert reconstruction["lpips_weights"].startswith("NOT the official weights")
    sweep = json.loads((repo / "metrics" / "sweep.json").read_text())
    assert sweep["chosen"]["frechet_distance"] >= 0 and len(sweep["points"]) >= 2 + 5  # search and the 5 wide points


def test_gpu_check_refuses_without_cuda() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert "benchmarks.gpu_check: no CUDA GPU here" in result.stderr and "stages.rehearse --all" in result.stderr
