"""Shared test helpers: the reference fixture location, small model configs, a checkpoint store
of each test module's own, and a Prefect server for the modules that run flows."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
if "PREFECT_HOME" not in os.environ:  # keep the user's ~/.prefect untouched
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from stages.train import STORE_ENV  # noqa: E402
from unite.config import ModelConfig, model_config  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY_FIXTURE = FIXTURES / "unite_parity_a.pt"
API_AUTH = f"unite-test-{secrets.token_urlsafe(16)}"

# scripts/test runs the suite on two pytest-xdist workers. Each module's tests stay on one worker,
# in their order, so that its module fixtures (a pipeline run, a Prefect server, a Slurm cluster)
# are built once and its tests find the state the earlier ones left, except in these modules, whose
# tests are long, independent and their fixtures cheap.
SPREAD_ACROSS_WORKERS = {"test_rehearsal.py", "test_dry_run.py"}
# The longest modules first, so that the two workers finish together (`--no-loadscope-reorder`).
LONGEST_FIRST = ["test_rehearsal.py", "test_pipeline.py", "test_flows.py", "test_slurm.py", "test_dry_run.py",
                 "test_reference.py", "test_launch.py", "test_fid_cli.py"]


def work_unit(nodeid: str) -> str:
    """What xdist hands one worker as a whole: the test's module, or the test itself in the modules
    spread across workers."""
    module = nodeid.split("::", 1)[0]
    return nodeid if Path(module).name in SPREAD_ACROSS_WORKERS else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scope scheduler with `work_unit` as the scope. (Its `--dist loadgroup` marks do not
    group under pytest 9.2, which no longer reads the node id that xdist 3.8 rewrites.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
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


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """A temporary Prefect server for the module that asks for it (~12 s to start), and only while
    it runs: the events client's websocket keepalive pings draw from the global `random`
    generator, which would break the bit-exact RNG checks of the training tests that run later in
    the same process.

    The server requires an API auth string, as the README's cluster setup runs it: this process
    and every command the tests start send it (PREFECT_API_AUTH_STRING in their environment)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_SERVER_API_AUTH_STRING, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        pytest.MonkeyPatch.context() as patch,
        temporary_settings(updates={PREFECT_SERVER_API_AUTH_STRING: API_AUTH, PREFECT_API_AUTH_STRING: API_AUTH}),
    ):
        patch.setenv("PREFECT_API_AUTH_STRING", API_AUTH)
        with prefect_test_harness(server_startup_timeout=120):
            yield


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
