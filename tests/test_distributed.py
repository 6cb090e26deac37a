"""Process setup: device names are checked before any process group is joined, and a torchrun
worker does not outlive its launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


_WORKER = """
import os, signal, sys, time
from pathlib import Path
from unite.distributed import init_runtime
out = Path(sys.argv[1])
def publish(name, text):  # whole or not at all: the test polls for the file and reads it at once
    out.joinpath(f".{name}").write_text(text)
    os.replace(out / f".{name}", out / name)
init_runtime("cpu")
signal.signal(signal.SIGHUP, lambda signum, frame: (publish("signal", str(signum)), sys.exit(0)))
publish("worker", f"{os.getpid()} {os.getppid()}")
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are a Linux feature")
def test_a_torchrun_worker_gets_sighup_when_its_launcher_is_killed(tmp_path: Path):
    """torchrun puts workers in sessions of their own: a SIGKILL of the launcher's process group
    (a cancelled DVC or Prefect run) would otherwise leave them running."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "1", str(script), str(tmp_path)],
                                env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "worker").exists():
        assert launcher.poll() is None, "torchrun exited before the worker started"
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.1)
    worker, parent = map(int, (tmp_path / "worker").read_text().split())
    assert parent == launcher.pid
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    while not (tmp_path / "signal").exists():
        assert time.monotonic() < deadline, "the worker outlived its launcher without a signal"
        time.sleep(0.1)
    assert int((tmp_path / "signal").read_text()) == signal.SIGHUP
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(worker)


def running(pid: int) -> bool:
    """Not exited (an exited orphan may stay a zombie where the init process does not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
