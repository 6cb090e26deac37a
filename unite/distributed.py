"""Process setup shared by training and generation: one process, or one rank of a torchrun launch
(one node or many), with NCCL on CUDA and gloo on CPU."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import threading
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
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_with_launcher()
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=target)
        else:
            dist.init_process_group("gloo")
    return Runtime(dist.get_rank() if world_size > 1 else 0, world_size, target)


_PR_SET_PDEATHSIG = 1


def stop_with_launcher() -> None:
    """Have Linux send this torchrun worker SIGHUP when its launcher dies.

    torchrun starts each worker in a session of its own, so killing the launcher's process group
    (a cancelled DVC or Prefect run, a SIGKILL) would leave the worker running, still writing
    checkpoints that a rerun reads. SIGHUP ends other work; training takes it as a request to
    finish the step, write a checkpoint and exit. It may come more than once, as each thread of
    a dying launcher exits. Elsewhere than Linux this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a launcher under nohup passes SIGHUP ignored
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGHUP), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the launcher died before the request was made
        raise RuntimeError("the torchrun launcher of this worker has already exited")


def close_runtime() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
