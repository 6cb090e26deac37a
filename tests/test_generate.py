"""Generation: noise per (seed, index), rank/batch invariance, balanced labels, grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import perturb_, small_config
from unite.generate import (
    GridSamples,
    class_balanced_labels,
    generate,
    noise_for,
    rank_blocks,
    sample_grid,
    write_npz,
    write_pngs,
)
from unite.metrics.fid import to_uint8
from unite.model import UNITE
from unite.sampling import Guidance


@pytest.fixture(scope="module")
def model() -> UNITE:
    torch.manual_seed(0)
    model = UNITE(small_config()).eval()
    perturb_(model)
    return model


def collect(model, **kwargs) -> dict[int, np.ndarray]:
    images = {}
    for indices, _, batch in generate(model, progress=False, **kwargs):
        images.update(zip(indices, batch.numpy()))
    return images


def test_noise_depends_only_on_seed_and_index():
    alone = noise_for([5], seed=3, shape=(4, 2))
    together = noise_for([0, 5, 9], seed=3, shape=(4, 2))
    assert torch.equal(alone[0], together[1])
    assert not torch.equal(noise_for([5], seed=4, shape=(4, 2)), alone)
    assert not torch.equal(together[0], together[2])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_every_index_exactly_once(world_size):
    seen = [i for rank in range(world_size) for block in rank_blocks(10, 3, rank, world_size) for i in block]
    assert sorted(seen) == list(range(10))


def test_labels_are_tiled_over_classes():
    assert class_balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_images_do_not_depend_on_the_number_of_ranks(model):
    # Ranks take whole blocks, so any solver gives identical images; euler keeps the test fast.
    kwargs = dict(num_images=5, guidance=Guidance(scale=2.0), seed=7, block_size=2, solver="euler", steps=4)
    single = collect(model, **kwargs)
    split = {}
    for rank in range(2):
        split.update(collect(model, rank=rank, world_size=2, **kwargs))
    assert sorted(split) == list(range(5))
    assert all(np.array_equal(single[i], split[i]) for i in range(5))


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_fixed_step_images_do_not_depend_on_the_block_size(model, solver):
    kwargs = dict(num_images=5, guidance=Guidance(scale=2.0), seed=1, solver=solver, steps=3)
    by_two = collect(model, block_size=2, **kwargs)
    by_five = collect(model, block_size=5, **kwargs)
    assert all(np.array_equal(by_two[i], by_five[i]) for i in range(5))


def test_uint8_conversion_truncates():
    images = torch.tensor([0.0, 0.999, 1.0, 1.2, -0.1]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(images, channels_last=True)[0, 0, :, 0].tolist() == [0, 254, 255, 255, 0]


def test_grid_puts_each_class_on_its_row():
    images = np.stack([np.full((2, 2, 3), 10 * i, dtype=np.uint8) for i in range(6)])
    labels = np.array([0, 1, 2, 0, 1, 2])
    grid = np.asarray(sample_grid(images, labels, num_classes=3, per_class=2))
    assert grid.shape == (3 * 4, 2 * 4, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 30  # class 0: images 0 and 3
    assert grid[9, 1, 0] == 20 and grid[9, 5, 0] == 50  # class 2: images 2 and 5


def test_grid_enlarges_images_by_nearest_neighbour():
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    grid = np.asarray(sample_grid(images, np.array([0, 1]), num_classes=2, per_class=1, scale=3))
    assert grid.shape == (2 * (6 + 2), 6 + 2, 3)
    for cls in range(2):
        cell = grid[cls * 8 + 1 : cls * 8 + 7, 1:7]
        expected = np.kron(images[cls], np.ones((3, 3, 1), dtype=np.uint8))
        assert np.array_equal(cell, expected)


def test_grid_samples_keep_the_first_images_of_each_class():
    images = torch.stack([torch.full((2, 2, 3), 10 * i, dtype=torch.uint8) for i in range(6)])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    kept = GridSamples(num_classes=3, per_class=1)
    kept(range(0, 4), labels[:4], images[:4])
    kept(range(4, 6), labels[4:], images[4:])
    expected = sample_grid(images.numpy(), labels.numpy(), num_classes=3, per_class=1)
    assert np.array_equal(np.asarray(kept.grid()), np.asarray(expected))


def test_npz_of_png_files_holds_them_in_index_order(tmp_path):
    images = torch.randint(0, 256, (5, 4, 3, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_pngs(tmp_path / "pngs", range(5), images)
    write_npz(tmp_path / "pngs", 5, tmp_path / "images.npz")
    with np.load(tmp_path / "images.npz") as data:
        assert data.files == ["arr_0"] and np.array_equal(data["arr_0"], images.numpy())
