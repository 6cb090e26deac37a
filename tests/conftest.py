"""Shared test helpers: the reference fixture location, small model configs, and a checkpoint
store of each test module's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stages.train import STORE_ENV
from unite.config import ModelConfig, model_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY_FIXTURE = FIXTURES / "unite_parity_a.pt"

# scripts/test runs the suite on two pytest-xdist workers (`--dist loadgroup`). Each module's tests
# stay on one worker, so that its module fixtures (a pipeline run, a Prefect server, a Slurm
# cluster) are built once, except in these modules, whose tests are long and their fixtures cheap.
SPREAD_ACROSS_WORKERS = {"test_rehearsal.py", "test_dry_run.py"}
# The longest modules first, so that the two workers finish together (`--no-loadscope-reorder`).
LONGEST_FIRST = ["test_rehearsal.py", "test_pipeline.py", "test_flows.py", "test_slurm.py", "test_dry_run.py",
                 "test_reference.py", "test_launch.py", "test_fid_cli.py"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name not in SPREAD_ACROSS_WORKERS:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


@pytest.fixture(scope="module", autouse=True)
def checkpoint_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every training the module's tests start, in any process they spawn, writes to this
    module's own checkpoint store: never the user's, never another module's."""
    store = tmp_path_factory.mktemp("checkpoint-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STORE_ENV, str(store))
        yield store


@pytest.fixture(scope="session")
def parity_fixture_path() -> Path:
    """The reference fixture kept in the repository (see tests/fixtures/README.md)."""
    return PARITY_FIXTURE


@pytest.fixture(scope="session")
def parity_fixture(parity_fixture_path: Path) -> dict:
    """The fixture's contents: tensors and plain values only, so weights-only loading suffices."""
    return torch.load(parity_fixture_path, map_location="cpu", weights_only=True)


def small_config(**overrides) -> ModelConfig:
    """32x32 images, patch 4, 64 latent tokens of 8 channels: fast on a CPU."""
    values = dict(image_size=32, patch_size=4, num_latent_tokens=64, latent_dim=8, num_classes=10,
                  in_context_len=4, perceptual_weight=0.0)
    values.update(overrides)
    return model_config("Tiny", "Tiny", **values)


@pytest.fixture
def one_thread():
    """One intra-op thread: fast on a shared 2-core machine and the same in every process
    (CPU float kernels may depend on the thread count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def perturb_(module: torch.nn.Module, std: float = 0.02) -> None:
    """Add noise to every parameter so that zero-initialised paths carry signal (as the
    reference fixture does)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
