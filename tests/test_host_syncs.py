"""unite.host_syncs.HostSyncCounter against the definition of a host sync (the host waits for a
device value), and the training step's count on fake CUDA tensors: nothing read inside the
micro-batch loop, nothing blocking per optimizer step."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.bench_train import build_on, count_host_syncs
from test_train import train_config
from unite.distributed import Runtime
from unite.dry_run import fake_cuda, gradients_instead_of_backward
from unite.host_syncs import HostSyncCounter
from unite.model import UNITE
from unite.train_config import recipe_for
from unite.train_step import Engine, SHARED_VALUES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fake():
    with FakeTensorMode() as mode:
        yield mode


def test_item_is_one_sync_of_one_value(fake) -> None:
    x = torch.ones(5, device="cuda")
    with HostSyncCounter() as counter:
        assert x.sum().item() == 0  # fake values: the counter answers
    assert (counter.syncs, counter.values, dict(counter.where)) == (1, 1, {"item": 1})


def test_tolist_is_one_sync_of_n_values(fake) -> None:
    x, y = torch.ones(8, device="cuda"), torch.ones(3, device="cuda")
    with HostSyncCounter() as counter:
        assert x.tolist() == [0] * 8
        y.tolist()
    assert (counter.syncs, counter.values) == (2, 11)


def test_bool_of_a_device_tensor_is_a_sync(fake) -> None:
    x = torch.ones(4, device="cuda")
    with HostSyncCounter(answer=True) as counter:
        assert bool((x > 0).all())
    assert (counter.syncs, counter.values) == (1, 1)


def test_a_blocking_copy_to_the_host_is_a_sync_a_non_blocking_one_is_not(fake) -> None:
    x = torch.ones(6, device="cuda")
    with HostSyncCounter() as counter:
        x.cpu()
        host = torch.empty(6)
        host.copy_(x)
    assert (counter.syncs, counter.values, dict(counter.where)) == (2, 12, {"copy to host": 2})
    with HostSyncCounter() as counter:
        x.to("cpu", non_blocking=True)
        host.copy_(x, non_blocking=True)
        host.copy_(x, True)  # non_blocking given by position
    assert (counter.syncs, counter.values) == (0, 0)


def test_a_blocking_copy_to_the_device_is_a_sync_a_fill_or_non_blocking_copy_is_not(fake) -> None:
    # torch synchronises the stream after a blocking copy from pageable host memory.
    with HostSyncCounter() as counter:
        torch.tensor(1.0, device="cuda")
        torch.ones(3).to("cuda")
    assert (counter.syncs, counter.values, dict(counter.where)) == (2, 0, {"copy to device": 2})
    with HostSyncCounter() as counter:
        torch.full((), 1.0, device="cuda")
        torch.ones(3).to("cuda", non_blocking=True)
    assert (counter.syncs, counter.values) == (0, 0)


def test_reads_of_host_tensors_are_not_syncs() -> None:
    x = torch.arange(4.0)
    with HostSyncCounter() as counter:
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert x.sum().item() == 6.0
        assert bool((x >= 0).all())
        x.cpu()
    assert (counter.syncs, counter.values) == (0, 0)


def test_the_step_count_sees_a_read_in_the_micro_batch_loop_and_after_it(fake) -> None:
    """The harness itself: a step reading one value before clipping and a 3-value tolist after."""
    weight = torch.ones(3, device="cuda", requires_grad=True)

    def step() -> None:
        loss = (weight * 2).sum()
        loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([weight], 1.0)
        weight.detach().tolist()

    with gradients_instead_of_backward():
        report = count_host_syncs(step, steps=3)
    assert report["syncs_per_step"] == [2, 2, 2] and report["syncs_in_micro_batch_loop"] == 3
    assert report["values_per_step_amortised"] == 4 and weight.grad is not None


def test_the_engine_step_reads_nothing_on_the_host(tmp_path) -> None:
    """Engine.step on fake CUDA tensors, two micro-batches per step, three steps: no sync in
    the micro-batch loop, none per optimizer step; its values leave by a non-blocking copy."""
    cfg = train_config(tmp_path, device="cpu")  # the engine below runs on (fake) CUDA
    device = torch.device("cuda")
    with fake_cuda():
        engine = Engine(build_on(device, lambda: UNITE(cfg.model)), cfg, Runtime(0, 1, device),
                        recipe_for(cfg, 1))
        assert engine.accum == 2
        images = torch.rand(4, 3, 16, 16, device=device)
        labels = torch.randint(0, 10, (4,), device=device)
        batches = iter(lambda: (images, labels), None)
        pending = []
        with gradients_instead_of_backward():
            report = count_host_syncs(lambda: pending.append(engine.step(batches, lambda: False)), steps=3)
        assert all(p.grad is None for p in engine.params)  # zeroed after every step, as in training
        assert [p.values.device.type for p in pending] == ["cpu"] * 3
        assert pending[0].values.shape == (len(SHARED_VALUES),)
    assert report["syncs_per_step"] == [0, 0, 0] and report["syncs_in_micro_batch_loop"] == 0
    assert report["values_per_step_amortised"] == 0
