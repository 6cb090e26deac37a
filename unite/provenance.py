"""Where a result came from: the code's commit, the params, the packages and the device, so that
a metric read months later can be traced to what produced it."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch


def params_hash(params: Mapping[str, Any]) -> str:
    """sha256 of the params as canonical JSON: equal params give equal hashes, whatever the YAML layout."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def git_state(cwd: str | Path = ".") -> str:
    """The checked-out commit, marked when the work tree has uncommitted changes; 'unknown' outside git."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed version of each named distribution ('not installed' when absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def run_environment(device: torch.device) -> dict[str, str]:
    """The commit, torch and Python versions and the device of a run, as one JSON-ready mapping."""
    return {"git_commit": git_state(), "torch": torch.__version__, "python": platform.python_version(),
            "device": device_name(device)}
