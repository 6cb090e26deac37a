"""Evaluation runs: seeded reconstruction draws and the image limit; the evaluate stage's streamed
generation and scoring equal to holding every image, on one rank or two, with rank 0 holding at
most two blocks of images at once; the evaluation protocols and TF32."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image
from safetensors.torch import save_file

import stages.evaluate as evaluate_stage
import unite.evaluation as evaluation
from conftest import perturb_, small_config
from unite.checkpoint import exported_tensors
from unite.data.manifest import write_manifest
from unite.data.shards import write_shards
from unite.demo_data import write_demo_folder
from unite.evaluation import EvaluationProtocol, allow_tf32_matmul, load_split, reconstruct
from unite.generate import NpzImageWriter, generate, sample_grid
from unite.metrics.class_consistency import class_consistency
from unite.metrics.features import PixelFeatures
from unite.metrics.fid import GaussianStats, compute_reference_stats, evaluate_images
from unite.metrics.pixel_classifiers import PixelClassifier
from unite.model import UNITE
from unite.sampling import Guidance

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The digits at 32x32, sharded as the shard stage does: shards/{train,val}."""
    tmp = tmp_path_factory.mktemp("evaluation")
    write_demo_folder(tmp / "raw", image_size=32)
    for split in ("train", "val"):
        write_manifest(tmp / "raw" / split, tmp / f"{split}.tsv", progress=False)
        write_shards(tmp / "raw" / split, tmp / f"{split}.tsv", tmp / "shards" / split, image_size=32,
                     shard_size=500, workers=1, progress=False)
    return tmp / "shards"


@pytest.fixture(scope="module")
def val_shards(shards) -> Path:
    return shards / "val"


@pytest.fixture(scope="module")
def model() -> UNITE:
    torch.manual_seed(0)
    model = UNITE(small_config()).eval()
    perturb_(model, std=0.2)  # large enough that the tokenization noise shows in the output
    return model


def run(model: UNITE, shards: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    originals, reconstructions = zip(*reconstruct(model, shards, batch_size=8, limit=20, seed=seed))
    return torch.cat(originals), torch.cat(reconstructions)


def test_reconstructions_depend_on_the_seed_not_on_the_global_generator(model, val_shards):
    torch.manual_seed(1)
    originals, first = run(model, val_shards, seed=0)
    torch.manual_seed(2)
    torch.rand(1000)
    _, again = run(model, val_shards, seed=0)
    _, other = run(model, val_shards, seed=1)
    assert originals.shape == first.shape == (20, 3, 32, 32)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert 0 <= first.min() and first.max() <= 1


# The evaluate stage's streaming generation and scoring, on one rank and on two, against the
# gather-everything path it replaced; and the images rank 0 holds while it streams.

STREAM = dict(num_images=10, seed=3, solver="euler", steps=3, block_size=3)
GUIDANCE = Guidance(scale=2.0)
EVALUATE = {**STREAM, "nproc_per_node": 1, "protocol": "separate", "grid_per_class": 1, "recon_images": 4,
            "class_consistency": True, "lpips": False, "kid_subset_size": 5}
GRID_SCALE = 2  # the stage enlarges 32-pixel samples to 64 in the grid


def stream_model() -> UNITE:
    torch.manual_seed(0)
    model = UNITE(small_config()).eval()
    perturb_(model)
    return model


def stream_reference() -> GaussianStats:
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return compute_reference_stats(images.split(16), PixelFeatures(8), progress=False)


def sample_shards(root: Path, val: Path) -> Path:
    """Shards whose train split is the stream model's samples, each under the class it was
    generated for: a judge trained on them tells the samples' classes apart, where one trained on
    the digits gives every sample of this untrained model the same class and so scores any
    pairing of labels and images alike."""
    for indices, labels, images in generate(stream_model(), guidance=GUIDANCE, progress=False, **STREAM):
        for index, label, image in zip(indices, labels.tolist(), images.numpy()):
            (root / "raw" / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "raw" / str(label) / f"{index}.png")
    write_manifest(root / "raw", root / "train.tsv", progress=False)
    write_shards(root / "raw", root / "train.tsv", root / "shards" / "train", image_size=32, shard_size=500,
                 workers=1, progress=False)
    (root / "shards" / "val").symlink_to(val)
    return root / "shards"


@pytest.fixture(scope="module")
def stage_workspace(shards, tmp_path_factory) -> Path:
    """What the evaluate stage reads: params.yaml (pixel features), an export of the model, the
    sweep's choice, reference statistics, and the shards (sample_shards)."""
    root = tmp_path_factory.mktemp("stage")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["fid_ref"]["feature_space"] = "pixel"
    params["evaluate"].update(EVALUATE)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    model = stream_model()
    info = {"model_config": dataclasses.asdict(model.cfg), "step": 0, "epoch": 0, "ema_decay": 0.0}
    save_file(exported_tensors(model.state_dict()), str(root / "model.safetensors"),
              metadata={"unite": json.dumps(info)})
    (root / "model.json").write_text(json.dumps(info))
    chosen = {"scale": GUIDANCE.scale, "interval": list(GUIDANCE.interval), "norm_order": GUIDANCE.norm_order}
    (root / "sweep.json").write_text(json.dumps({"chosen": chosen}))
    stream_reference().save(root / "reference.npz")
    (root / "shards").symlink_to(sample_shards(tmp_path_factory.mktemp("sample-shards"), shards / "val"))
    return root


def stage_argv(out: Path) -> list[str]:
    """The evaluate stage's options as dvc.yaml passes them, outputs under `out`."""
    return ["--model", "model.safetensors", "--sweep", "sweep.json", "--reference", "reference.npz",
            "--shards", "shards", "--samples", str(out / "samples"), "--metrics", str(out / "eval.json")]


class HeldImages:
    """Wraps the stage's source of image blocks on rank 0 (unite.evaluation.generate_in_order) and
    counts, each time a block arrives, the images of every block it yielded that is still alive."""

    def __init__(self) -> None:
        self.alive = 0
        self.most = 0

    def wrap(self, generate_in_order):
        def counted(*args, **kwargs):
            for indices, labels, images in generate_in_order(*args, **kwargs):
                self.alive += len(images)
                weakref.finalize(images, self._freed, len(images))
                self.most = max(self.most, self.alive)
                yield indices, labels, images
        return counted

    def _freed(self, count: int) -> None:
        self.alive -= count


def run_stage(workspace: Path, out: Path, patch: pytest.MonkeyPatch) -> int:
    """The evaluate stage's main in `workspace`; returns the most images rank 0 held at once."""
    held = HeldImages()
    patch.setattr(evaluation, "generate_in_order", held.wrap(evaluation.generate_in_order))
    patch.chdir(workspace)
    evaluate_stage.main(stage_argv(out))
    return held.most


def gathered(workspace: Path, npz: Path) -> tuple[dict, float, np.ndarray]:
    """The path it replaced: all images in memory, then scored, saved and judged at once."""
    parts = list(generate(stream_model(), guidance=GUIDANCE, progress=False, **STREAM))
    images = torch.cat([part[2] for part in parts])
    labels = torch.cat([part[1] for part in parts])
    block = STREAM["block_size"]
    batches = (images[i : i + block].permute(0, 3, 1, 2) for i in range(0, len(images), block))
    scores = evaluate_images(batches, stream_reference(), PixelFeatures(8), progress=False)
    np.savez(npz, images.numpy())
    judge = PixelClassifier(*load_split(workspace / "shards" / "train"))
    consistency = class_consistency(judge, images.permute(0, 3, 1, 2), labels)
    assert consistency != class_consistency(judge, images.permute(0, 3, 1, 2), labels.roll(1))  # sees the pairing
    grid = sample_grid(images.numpy(), labels.numpy(), 10, 1, scale=GRID_SCALE)
    return scores, consistency, np.asarray(grid)


def assert_same_as_gathered(out: Path, expected: tuple, expected_npz: Path) -> None:
    scores, consistency, grid = expected
    generation = json.loads((out / "eval.json").read_text())["generation"]
    assert {key: generation[key] for key in scores} == scores and scores["num_images"] == STREAM["num_images"]
    assert generation["class_consistency"] == consistency
    with Image.open(out / "samples" / "grid.png") as saved:
        assert np.array_equal(np.asarray(saved), grid)
    with np.load(out / "samples" / "images.npz") as data, np.load(expected_npz) as old:
        assert data.files == ["arr_0"]
        assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], old["arr_0"])
    assert not list((out / "samples").glob("*.partial"))


@pytest.fixture(scope="module")
def one_thread():
    # CPU float kernels may depend on the thread count; every rank below runs one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gathered_result(one_thread, stage_workspace, tmp_path_factory) -> tuple[tuple, Path]:
    npz = tmp_path_factory.mktemp("gathered") / "old.npz"
    return gathered(stage_workspace, npz), npz


# Rank 0 holds the block it scores and the one arriving; a rank 0 that kept every image would hold all 10.
MOST_HELD = 2 * STREAM["block_size"]


def test_the_stage_streams_the_same_scores_and_npz_as_gathering(gathered_result, stage_workspace, tmp_path,
                                                                monkeypatch):
    most_held = run_stage(stage_workspace, tmp_path, monkeypatch)
    assert_same_as_gathered(tmp_path, *gathered_result)
    assert 0 < most_held <= MOST_HELD < STREAM["num_images"]


def _stage_rank(rank: int, port: int, workspace: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    with pytest.MonkeyPatch.context() as patch:
        most_held = run_stage(Path(workspace), Path(out), patch)
    if rank == 0:
        (Path(out) / "held.json").write_text(json.dumps(most_held))


def test_the_stage_on_two_ranks_streams_the_same_scores_and_npz(gathered_result, stage_workspace, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_stage_rank, args=(port, str(stage_workspace), str(tmp_path)), nprocs=2)
    assert_same_as_gathered(tmp_path, *gathered_result)
    assert 0 < json.loads((tmp_path / "held.json").read_text()) <= MOST_HELD


def test_npz_writer_keeps_no_file_when_images_are_missing(tmp_path):
    path = tmp_path / "images.npz"
    with pytest.raises(ValueError, match=r"images.npz: 2 images written, 3 expected"):
        with NpzImageWriter(path, (3, 2, 2, 3)) as writer:
            writer(range(0, 2), torch.zeros(2), torch.zeros((2, 2, 2, 3), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got 1 images 2..2 .* after 0 written"):
        with NpzImageWriter(path, (3, 2, 2, 3)) as writer:
            writer(range(2, 3), torch.zeros(1), torch.zeros((1, 2, 2, 3), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got 2 images 2..3 .* up to 3 images"):
        with NpzImageWriter(path, (3, 2, 2, 3)) as writer:
            writer(range(0, 2), torch.zeros(2), torch.zeros((2, 2, 2, 3), dtype=torch.uint8))
            writer(range(2, 4), torch.zeros(2), torch.zeros((2, 2, 2, 3), dtype=torch.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_matmul_is_set_for_cuda_only(enabled: bool) -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not enabled
        allow_tf32_matmul(enabled, torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 == (not enabled)
        allow_tf32_matmul(enabled, torch.device("cuda", 0))  # sets a flag only: no CUDA device is touched
        assert torch.backends.cuda.matmul.allow_tf32 == enabled
        assert torch.backends.cudnn.allow_tf32 == before[1]  # cuDNN keeps its setting
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_protocols_pick_the_search_images_and_the_block_size():
    params = {"sweep": {"num_images": 20, "seed": 1, "solver": "euler", "steps": 2, "block_size": 7},
              "evaluate": {"num_images": 30, "seed": 5, "solver": "dopri5", "steps": 3, "block_size": 250}}
    separate, reference = EvaluationProtocol.named("separate"), EvaluationProtocol.named("reference")
    assert separate.search_images(params) == params["sweep"]
    assert separate.generation(params["evaluate"]) == params["evaluate"]
    assert reference.search_images(params) == {**params["evaluate"], "block_size": 16}
    assert reference.generation(params["evaluate"]) == {**params["evaluate"], "block_size": 16}
    assert (separate.is_split_order, separate.tf32, reference.is_split_order, reference.tf32) == (
        "shuffled", False, "image_order", True)
    with pytest.raises(ValueError, match=r"evaluate.protocol='reported': must be one of \['separate', 'reference'\]"):
        EvaluationProtocol.named("reported")
