"""Loading `.pt` files from elsewhere (released checkpoints, fixtures, weights) without running code.

`torch.load(..., weights_only=True)` rebuilds tensors and plain Python values only, never arbitrary
objects, so a tampered file cannot run code as the user. ALLOWED_GLOBALS adds exactly what the
reference's checkpoints store beyond that: a numpy float64 scalar (`current_best_cfg_scale`). A file
that needs anything else is refused with UntrustedPickleError, whose one-line message names what the
file wanted and how to opt in; a user who trusts the file opts in and gets full unpickling after a
warning.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unite.config import ConfigError

try:  # numpy >= 2 keeps it in numpy._core, numpy 1.x in numpy.core
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar

# A numpy float64 scalar pickles as scalar(dtype('float64'), raw bytes); a file written under
# numpy 1.x names the function numpy.core.multiarray.scalar, one written under numpy 2.x
# numpy._core.multiarray.scalar. Only the float64 dtype can be built (other dtypes are refused).
ALLOWED_GLOBALS: list[Any] = [
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    type(np.dtype(np.float64)),
]

# The opt-in of `unite import-reference` and `unite parity`, and of the functions behind them.
TRUST_PICKLE_FLAG = "--trust-pickle (trust_pickle=True in Python)"

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_BUILT_TYPE = re.compile(r"but got <class '([\w.]+)'>")


class UntrustedPickleError(Exception):
    """A file that needs more than tensors and plain values to load: loading it could run code.
    Not a ValueError, so that code treating unreadable files as damaged (falling back to an older
    checkpoint, say) never passes over a refused one silently."""


def load_torch_file(path: str | Path, opt_in: str | None, trust_pickle: bool = False) -> Any:
    """The object in the torch.save file `path`, on the CPU, rebuilt weights-only.

    A file that needs more raises UntrustedPickleError naming what it wanted and `opt_in` (how the
    caller's user passes trust_pickle; None where the genuine file never needs it); with
    `trust_pickle` such a file is fully unpickled after a warning on stderr."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not zipfile.is_zipfile(path) and not trust_pickle:
            # torch.save has written zip archives since torch 1.6; garbage read as a legacy pickle
            # "names" random globals, so a file that is no archive is reported as damaged (and
            # still refused), not as a file that wants to run code.
            raise ValueError(f"{path}: not a torch.save archive (truncated or damaged): {_first_line(error)}") from None
        wanted = _wanted_objects(path, error)
    if not trust_pickle:
        remedy = f"if you trust this file, opt in with {opt_in}" if opt_in else "the file must hold only those"
        raise UntrustedPickleError(
            f"{path}: refused to load: it wants to unpickle {wanted}, which can run code (only tensors and "
            f"plain values load by default); {remedy}"
        )
    print(f"warning: fully unpickling {path} ({opt_in}): it wants {wanted}; this runs any code the file holds",
          file=sys.stderr)
    return torch.load(path, map_location="cpu", weights_only=False)


def _wanted_objects(path: Path, error: pickle.UnpicklingError) -> str:
    """The globals (functions, classes) a refused file names, or torch's reason when none is found."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, pickle.UnpicklingError):  # e.g. torch's legacy (non-zip) format
        names = []
    message = str(error)
    names = names or _GLOBAL.findall(message) or _BUILT_TYPE.findall(message)
    if names:
        return ", ".join(sorted(set(names)))
    detail = message.split("WeightsUnpickler error:", 1)[-1].strip()
    return detail.splitlines()[0] if detail else "objects beyond tensors and plain values"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def trust_pickle_from_env(variable: str) -> bool:
    """The opt-in of an environment variable: unset, empty or "0" is no, "1" is yes."""
    value = os.environ.get(variable, "")
    if value not in ("", "0", "1"):
        raise ConfigError(f"{variable}={value!r}: must be 1 (trust pickled files) or 0 (refuse them)")
    return value == "1"


def weights_check(path: Path, sha256_prefix: str) -> str:
    """"official" when the file's sha256 starts with the official file's prefix, else a warning
    that travels with the metrics: scores from other weights (a rehearsal's random ones, a
    re-export) are not comparable with published numbers."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    sha256 = digest.hexdigest()
    if sha256.startswith(sha256_prefix):
        return "official"
    return f"NOT the official weights (sha256 {sha256[:16]}..., expected {sha256_prefix}...): not comparable to published scores"
