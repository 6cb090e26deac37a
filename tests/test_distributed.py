"""Process setup: device names are checked before any process group is joined."""

from __future__ import annotations

import pytest
import torch

from unite.config import ConfigError
from unite.distributed import Runtime, init_runtime


def test_a_single_cpu_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_runtime("cpu") == Runtime(0, 1, torch.device("cpu"))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CPU", ""])
def test_unknown_device_names_are_rejected(device):
    with pytest.raises(ConfigError, match=rf"device={device!r}: must be auto, cpu, cuda or cuda:N"):
        init_runtime(device)


def test_cuda_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda:1': CUDA is not available"):
        init_runtime("cuda:1")


def test_ranks_cannot_share_one_named_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="each rank takes cuda:LOCAL_RANK"):
        init_runtime("cuda:0")
