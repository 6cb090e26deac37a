"""Process setup shared by training and generation: one process, or one rank of a torchrun launch
(one node or many), with NCCL on CUDA and gloo on CPU."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unite.config import ConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str = "auto") -> Runtime:
    """This process's rank, world size and device; joins the process group under torchrun.

    device: auto (CUDA when available), cpu, cuda (ranks take cuda:LOCAL_RANK) or, for a single
    process, cuda:N."""
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(f"device={device!r}: must be auto, cpu, cuda or cuda:N")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and ":" in device:
        raise ConfigError(f"device={device!r}: under torchrun each rank takes cuda:LOCAL_RANK; use device=cuda")
    index = int(device.split(":")[1]) if ":" in device else int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device("cuda", index) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=target)
        else:
            dist.init_process_group("gloo")
    return Runtime(dist.get_rank() if world_size > 1 else 0, world_size, target)


def close_runtime() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
