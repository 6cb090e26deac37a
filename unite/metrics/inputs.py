"""The error type of evaluation inputs, and the resolution of the files they name (weights,
reference statistics): a param or CLI argument, else an environment variable, never a download."""

from __future__ import annotations

import os
from pathlib import Path


class MetricsInputError(ValueError):
    """A missing or malformed evaluation input (weights, statistics, images): the user must fix it."""


def resolve_input_file(path: str | os.PathLike | None, param: str, cli: str, env: str, expected: str) -> Path:
    """`path`, else the file named by env var `env`; a MetricsInputError naming `param` (or `env`),
    the value and `expected` when neither gives an existing file."""
    source = param
    if path is None or str(path) == "":
        path, source = os.environ.get(env) or None, env
    if path is None:
        raise MetricsInputError(f"no {param} given ({cli}) and {env} is not set: pass it or set {env} to {expected}")
    candidate = Path(path).expanduser()
    if not candidate.is_file():
        raise MetricsInputError(f"{source}={str(path)!r}: file not found; it must be {expected}")
    return candidate
