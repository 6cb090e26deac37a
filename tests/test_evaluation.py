"""Evaluation runs: seeded reconstruction draws and the image limit; streamed generation and
scoring equal to holding every image, on one rank or two; the evaluation protocols and TF32."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import perturb_, small_config
from unite.data.manifest import write_manifest
from unite.data.shards import write_shards
from unite.demo_data import write_demo_folder
from unite.distributed import Runtime
from unite.evaluation import EvaluationProtocol, allow_tf32_matmul, generate_and_score, reconstruct
from unite.generate import GridSamples, NpzImageWriter, generate, sample_grid
from unite.metrics.class_consistency import ClassConsistency, class_consistency
from unite.metrics.features import PixelFeatures
from unite.metrics.fid import GaussianStats, compute_reference_stats, evaluate_images
from unite.metrics.pixel_classifiers import PixelClassifier
from unite.model import UNITE
from unite.sampling import Guidance


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evaluation")
    write_demo_folder(tmp / "raw", image_size=32)
    write_manifest(tmp / "raw" / "val", tmp / "val.tsv", progress=False)
    write_shards(tmp / "raw" / "val", tmp / "val.tsv", tmp / "shards", image_size=32, shard_size=100, workers=1,
                 progress=False)
    return tmp / "shards"


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


# Streaming generation and scoring against the gather-everything path it replaced.

STREAM = dict(num_images=10, guidance=Guidance(scale=2.0), seed=3, solver="euler", steps=3, block_size=3)


def stream_model() -> UNITE:
    torch.manual_seed(0)
    model = UNITE(small_config()).eval()
    perturb_(model)
    return model


def stream_reference() -> GaussianStats:
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return compute_reference_stats(images.split(16), PixelFeatures(4), progress=False)


def stream_judge() -> PixelClassifier:
    generator = torch.Generator().manual_seed(1)
    return PixelClassifier(torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=generator),
                           torch.arange(60) % 10)


def stream(model: UNITE, runtime: Runtime, npz: Path) -> tuple[dict | None, float | None, np.ndarray | None]:
    """What the evaluate stage does: score, write the npz, count class consistency, keep the grid."""
    if not runtime.is_main:
        return generate_and_score(model, None, None, runtime=runtime, **STREAM), None, None
    grid, consistency = GridSamples(10, 1), ClassConsistency(stream_judge())
    with NpzImageWriter(npz, (STREAM["num_images"], 32, 32, 3)) as writer:
        scores = generate_and_score(model, PixelFeatures(4), stream_reference(), runtime=runtime,
                                    consumers=[writer, grid, consistency], **STREAM)
    return scores, consistency.value, np.asarray(grid.grid())


def gathered(model: UNITE, npz: Path) -> tuple[dict, float, np.ndarray]:
    """The path it replaced: all images in memory, then scored, saved and judged at once."""
    parts = list(generate(model, progress=False, **STREAM))
    images = torch.cat([part[2] for part in parts])
    labels = torch.cat([part[1] for part in parts])
    block = STREAM["block_size"]
    batches = (images[i : i + block].permute(0, 3, 1, 2) for i in range(0, len(images), block))
    scores = evaluate_images(batches, stream_reference(), PixelFeatures(4), progress=False)
    np.savez(npz, images.numpy())
    consistency = class_consistency(stream_judge(), images.permute(0, 3, 1, 2), labels)
    return scores, consistency, np.asarray(sample_grid(images.numpy(), labels.numpy(), 10, 1))


def assert_same_as_gathered(result: tuple, npz: Path, expected: tuple, expected_npz: Path) -> None:
    scores, consistency, grid = result
    assert scores == expected[0] and scores["num_images"] == STREAM["num_images"]
    assert consistency == expected[1]
    assert np.array_equal(grid, expected[2])
    with np.load(npz) as data, np.load(expected_npz) as old:
        assert data.files == ["arr_0"]
        assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], old["arr_0"])


@pytest.fixture(scope="module")
def one_thread():
    # CPU float kernels may depend on the thread count; every rank below runs one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gathered_result(one_thread, tmp_path_factory) -> tuple[tuple, Path]:
    npz = tmp_path_factory.mktemp("gathered") / "old.npz"
    return gathered(stream_model(), npz), npz


def test_streamed_scores_and_npz_equal_the_gathered_ones(gathered_result, tmp_path):
    result = stream(stream_model(), Runtime(0, 1, torch.device("cpu")), tmp_path / "images.npz")
    assert_same_as_gathered(result, tmp_path / "images.npz", *gathered_result)
    assert not list(tmp_path.glob("*.partial"))


def _stream_rank(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = stream(stream_model(), Runtime(rank, 2, torch.device("cpu")), Path(folder) / "images.npz")
    finally:
        dist.destroy_process_group()
    if rank == 0:
        scores, consistency, grid = result
        (Path(folder) / "result.json").write_text(json.dumps({"scores": scores, "consistency": consistency}))
        np.save(Path(folder) / "grid.npy", grid)


def test_two_ranks_stream_the_same_scores_and_npz(gathered_result, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_stream_rank, args=(port, str(tmp_path)), nprocs=2)
    saved = json.loads((tmp_path / "result.json").read_text())
    result = (saved["scores"], saved["consistency"], np.load(tmp_path / "grid.npy"))
    assert_same_as_gathered(result, tmp_path / "images.npz", *gathered_result)


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
