"""The sweep and evaluate stages run in a prepared workspace (an export, shards, reference
statistics, params.yaml): what each evaluation protocol changes (the images the CFG search scores,
the generation blocks, the Inception Score's splits, TF32), the wide points, the sample grid, the
search by KID."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch_fidelity.metric_kid import kid_features_to_metric

from conftest import perturb_, small_config
from stages import evaluate as evaluate_stage
from stages import sweep as sweep_stage
from unite.data.manifest import write_manifest
from unite.data.shards import write_shards
from unite.demo_data import write_demo_folder
from unite.data.readers import iter_shard_images
from unite.metrics.features import PixelFeatures
from unite.metrics.fid import compute_reference_set, compute_reference_stats
from unite.model import UNITE

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
SMALL = {
    "fid_ref": {"feature_space": "pixel"},
    "sweep": {"num_images": 20, "seed": 1000, "start_scale": 2.0, "step": 0.5, "max_extra_steps": 0,
              "solver": "euler", "steps": 2, "block_size": 7,
              "wide": [{"norm_order": "cfg_first", "interval": [0.1, 1.0]}]},
    "evaluate": {"num_images": 30, "seed": 5, "solver": "euler", "steps": 3, "block_size": 8, "grid_per_class": 2,
                 "recon_images": 10, "kid_subset_size": 10},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """What the stages before sweep leave behind, with 16-pixel digits and a small model."""
    root = tmp_path_factory.mktemp("stages")
    write_demo_folder(root / "raw", image_size=16)
    for split in ("train", "val"):
        write_manifest(root / "raw" / split, root / f"{split}.tsv", progress=False)
        write_shards(root / "raw" / split, root / f"{split}.tsv", root / "data" / "shards" / split, image_size=16,
                     shard_size=500, workers=1, progress=False)
    shards = sorted((root / "data" / "shards" / "train").glob("*.tar"))
    compute_reference_stats(iter_shard_images(shards), PixelFeatures(8), progress=False).save(root / "data" / "fid_ref.npz")
    torch.manual_seed(0)
    cfg = small_config(image_size=16, num_latent_tokens=16)
    model = UNITE(cfg)
    perturb_(model)
    (root / "models").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "models" / "unite-ema.safetensors"))
    (root / "models" / "unite-ema.json").write_text(json.dumps({"model_config": cfg.to_dict()}))
    return root


def workspace(prepared: Path, tmp_path: Path, monkeypatch, protocol: str) -> Path:
    for name in ("data", "models"):
        (tmp_path / name).symlink_to(prepared / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    params["evaluate"]["protocol"] = protocol
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stage_options(stage: str) -> list[str]:
    """The options dvc.yaml's cmd gives the stage (after `python -m stages.launch <stage>`)."""
    command = shlex.split(STAGES[stage]["cmd"])
    assert command[:4] == ["python", "-m", "stages.launch", stage], command
    return command[4:]


def run_stages(monkeypatch) -> tuple[dict, dict, dict]:
    """Run sweep then evaluate; returns their metrics and, per stage, what it asked for: the TF32
    setting and (num_images, seed, solver, steps, block_size, IS split order) of each generation."""
    calls: dict = {"sweep": {"tf32": [], "generation": []}, "evaluate": {"tf32": [], "generation": []}}
    for name, module in (("sweep", sweep_stage), ("evaluate", evaluate_stage)):
        real = module.generate_and_score

        def recorded(model, space, reference, num_images, guidance, seed, solver, steps, block_size, runtime,
                     consumers=(), *, is_split_order, _real=real, _calls=calls[name], **scoring):
            _calls["generation"].append((num_images, seed, solver, steps, block_size, is_split_order))
            return _real(model, space, reference, num_images, guidance, seed, solver, steps, block_size, runtime,
                         consumers, is_split_order=is_split_order, **scoring)

        monkeypatch.setattr(module, "generate_and_score", recorded)
        monkeypatch.setattr(module, "allow_tf32_matmul",
                            lambda enabled, device, _calls=calls[name]: _calls["tf32"].append((enabled, device.type)))
    sweep_stage.main(stage_options("sweep"))
    evaluate_stage.main(stage_options("evaluate"))
    metrics = [json.loads(Path(f"metrics/{name}.json").read_text()) for name in ("sweep", "eval")]
    return metrics[0], metrics[1], calls


def test_the_reference_protocol_scores_evaluates_images_in_blocks_of_16(prepared, tmp_path, monkeypatch):
    workspace(prepared, tmp_path, monkeypatch, "reference")
    sweep, evaluation, calls = run_stages(monkeypatch)
    chosen = sweep["chosen"]
    assert chosen["stage"] == "search" and chosen["interval"] == [0.1, 1.0] and chosen["norm_order"] == "norm_first"
    # Evaluate's count, seed, solver and steps, the reference's blocks of 16 (not block_size 7 or 8),
    # its in-order IS splits, TF32 on (the stub records the request on this CPU).
    reported = (30, 5, "euler", 3, 16, "image_order")
    assert set(calls["sweep"]["generation"]) == {reported} and len(calls["sweep"]["generation"]) == 3
    assert calls["evaluate"]["generation"] == [reported]
    assert calls["sweep"]["tf32"] == calls["evaluate"]["tf32"] == [(True, "cpu")]
    # Same images at the chosen setting: the same score, to the bit.
    assert evaluation["generation"]["fd"] == chosen["frechet_distance"]
    assert evaluation["generation"]["num_images"] == 30 and evaluation["generation"]["cfg_scale"] == chosen["scale"]
    settings = {"protocol": "reference", "is_split_order": "image_order", "tf32": True}
    assert {key: sweep[key] for key in settings} == settings
    assert sweep["search_images"] == {"num_images": 30, "seed": 5, "solver": "euler", "steps": 3, "block_size": 16}
    assert {key: evaluation[key] for key in settings} == settings
    assert evaluation["generation"]["block_size"] == 16 and evaluation["generation"]["seed"] == 5
    with np.load("samples/images.npz") as data:
        assert data["arr_0"].shape == (30, 16, 16, 3)


def test_the_separate_protocol_has_its_own_images_and_reports_wide_points(prepared, tmp_path, monkeypatch):
    """Also: the grid shows the 16-pixel digits enlarged 4x (nearest neighbour), at 64 pixels."""
    workspace(prepared, tmp_path, monkeypatch, "separate")
    sweep, evaluation, calls = run_stages(monkeypatch)
    # The sweep's own budget and block size, evaluate's block size, torch-fidelity's IS, no TF32.
    assert set(calls["sweep"]["generation"]) == {(20, 1000, "euler", 2, 7, "shuffled")}
    assert calls["evaluate"]["generation"] == [(30, 5, "euler", 3, 8, "shuffled")]
    assert calls["sweep"]["tf32"] == calls["evaluate"]["tf32"] == [(False, "cpu")]
    assert sweep["protocol"] == evaluation["protocol"] == "separate"
    assert evaluation["is_split_order"] == "shuffled" and evaluation["generation"]["block_size"] == 8
    assert [(p["scale"], p["norm_order"], p["stage"]) for p in sweep["points"]] == [
        (2.0, "norm_first", "search"), (1.5, "norm_first", "search"), (sweep["chosen"]["scale"], "cfg_first", "sweep")]
    assert sweep["chosen"]["stage"] == "search"
    assert evaluation["generation"]["fd"] != sweep["chosen"]["frechet_distance"]
    rows = Path("metrics/sweep.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["index", "stage", "cfg_scale", "interval_low", "interval_high", "norm_order",
                                   "frechet_distance"]
    assert len(rows) == 4
    with np.load("samples/images.npz") as data:
        images = data["arr_0"]
    grid = np.asarray(Image.open("samples/grid.png"))
    assert grid.shape == (10 * (64 + 2), 2 * (64 + 2), 3)
    # Class 3's second sample is image 13 (labels are tiled over the 10 classes).
    cell = grid[3 * 66 + 1 : 3 * 66 + 65, 66 + 1 : 66 + 65]
    assert np.array_equal(cell, np.kron(images[13], np.ones((4, 4, 1), dtype=np.uint8)))


def test_the_sweep_by_kid_chooses_the_kid_minimum_of_the_images_it_scored(prepared, tmp_path, monkeypatch):
    """sweep.metric: kernel_distance against a reference set with kept features: each point's value is
    torch-fidelity's KID of that point's images (kept here by a consumer), and the choice its minimum."""
    workspace(prepared, tmp_path, monkeypatch, "separate")
    (tmp_path / "data").unlink()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shards").symlink_to(prepared / "data" / "shards")
    shards = sorted((prepared / "data" / "shards" / "train").glob("*.tar"))
    space = PixelFeatures(8)
    reference = compute_reference_set(iter_shard_images(shards), space, set_images=50, progress=False)
    reference.save("data/fid_ref.npz")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["sweep"].update(metric="kernel_distance", kid_subsets=5, kid_subset_size=15)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    images = []
    real = sweep_stage.generate_and_score

    def kept(*args, **kwargs):
        images.append([])
        return real(*args, consumers=[lambda indices, labels, block: images[-1].append(block)], **kwargs)

    monkeypatch.setattr(sweep_stage, "generate_and_score", kept)
    sweep_stage.main(stage_options("sweep"))

    sweep = json.loads(Path("metrics/sweep.json").read_text())
    assert sweep["metric"] == "kernel_distance" and (sweep["kid_subsets"], sweep["kid_subset_size"]) == (5, 15)
    assert len(sweep["points"]) == len(images) >= 3
    for point, blocks in zip(sweep["points"], images):
        generated = space(torch.cat(blocks).permute(0, 3, 1, 2))[0].numpy().astype(np.float32)
        theirs = kid_features_to_metric(torch.from_numpy(generated).double(),
                                        torch.from_numpy(reference.features).double(), kid_subsets=5,
                                        kid_subset_size=15, verbose=False)["kernel_inception_distance_mean"]
        assert point["kernel_distance"] == pytest.approx(theirs, rel=1e-6)
    searched = [point for point in sweep["points"] if point["stage"] == "search"]
    assert sweep["chosen"] == min(searched, key=lambda point: point["kernel_distance"])
    rows = [row.split("\t") for row in Path("metrics/sweep.tsv").read_text().splitlines()]
    assert rows[0][-1] == "kernel_distance"
    assert [float(row[-1]) for row in rows[1:]] == [point["kernel_distance"] for point in sweep["points"]]
