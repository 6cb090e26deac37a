"""Training checkpoints: atomic files, keep-last-N, random-state capture, EMA export.

A checkpoint is `<dir>/step_<step>.pt`. The checkpoint at every `max_steps` a run reached is a
milestone (listed in `<dir>/milestones.json`): keep-last-N pruning never deletes it, so that a
run asked for that step again finds that exact model. A checkpoint is written to a temporary
name in the same folder, synced to disk and renamed, so a crash mid-write leaves at most a
`*.tmp` file, which `latest_checkpoint` never picks and the next save removes. A checkpoint that
cannot be read anyway (a disk fault, a copy cut short) is renamed `*.pt.unreadable` by
`load_newest_readable`, which resumes from the one before it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unite.config import ModelConfig
from unite.safe_load import UntrustedPickleError, load_torch_file, trust_pickle_from_env

_NAME = re.compile(r"^step_(\d+)\.pt$")
MILESTONES_FILE = "milestones.json"
_TMP_SUFFIX = ".tmp"
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointError(RuntimeError):
    """No checkpoint of a folder can be read, so training cannot resume from it."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint file, from its name."""
    match = _NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint name (step_<step>.pt)")
    return int(match.group(1))


def latest_checkpoint(directory: str | Path, max_step: int | None = None) -> Path | None:
    """The complete checkpoint with the highest step (at most `max_step` when given), or None."""
    found = [p for p in list_checkpoints(directory) if max_step is None or checkpoint_step(p) <= max_step]
    return found[-1] if found else None


def milestones(directory: str | Path) -> set[int]:
    """The steps whose checkpoints pruning keeps: each `max_steps` a run reached."""
    path = Path(directory) / MILESTONES_FILE
    return set(json.loads(path.read_text())) if path.is_file() else set()


def mark_milestone(directory: str | Path, step: int) -> None:
    """Record `step` as a milestone of `directory` (atomically: a reader sees the old or new list)."""
    directory = Path(directory)
    kept = milestones(directory)
    if step not in kept:
        listing = directory / f".{MILESTONES_FILE}.{os.getpid()}{_TMP_SUFFIX}"
        listing.write_text(json.dumps(sorted(kept | {step})) + "\n")
        os.replace(listing, directory / MILESTONES_FILE)


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep_last: int,
                    milestone: bool = False) -> Path:
    """Write `state` as the checkpoint of `step` atomically (recorded as a milestone when asked),
    then delete all but the newest `keep_last` checkpoints, milestones apart, and any temporary
    file a killed writer left behind."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: must be >= 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f".step_*{_TMP_SUFFIX}"):
        stale.unlink()
    final = checkpoint_path(directory, step)
    temporary = final.with_name(f".{final.name}.{os.getpid()}{_TMP_SUFFIX}")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    if milestone:
        mark_milestone(directory, step)
    _fsync_directory(directory)
    kept = milestones(directory)
    for old in list_checkpoints(directory)[:-keep_last]:
        if checkpoint_step(old) not in kept:
            old.unlink()
    return final


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: fsync the folder entry as well as the file."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def exclusive_folder(directory: str | Path, wait_s: float = 600.0) -> Iterator[None]:
    """Hold an exclusive lock on a checkpoint folder, so that one training run at a time writes
    and prunes it. A run that finds the folder locked (say, a killed run's worker still writing
    its last checkpoint) waits up to `wait_s` seconds, then raises TimeoutError. The lock is the
    kernel's (flock on the folder itself): it dies with its holder and leaves no file behind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline, announced = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"checkpoint folder {directory} is still locked by another training process after "
                        f"{wait_s:.0f} s; stop that process (see `fuser -v {directory}`) and run again"
                    ) from None
                if not announced:
                    print(f"unite.train: {directory} is locked by another training process; waiting up to "
                          f"{wait_s:.0f} s for it to exit", file=sys.stderr)
                    announced = True
                time.sleep(0.2)
            except OSError as error:  # some network filesystems cannot lock folders
                print(f"unite.train: warning: cannot lock {directory} ({error}); make sure no other run "
                      f"writes there", file=sys.stderr)
                break
        yield
    finally:
        os.close(fd)


# Set to 1 to fully unpickle a checkpoint that needs more than tensors and plain values.
TRUST_PICKLE_ENV = "UNITE_TRUST_PICKLE"


def load_checkpoint(path: str | Path, trust_pickle: bool | None = None) -> dict[str, Any]:
    """A checkpoint's contents on the CPU, rebuilt weights-only (tensors and plain values: a file
    from elsewhere runs no code); a clear error when the file is missing or unreadable.

    A file that needs full unpickling raises UntrustedPickleError unless `trust_pickle` (None: the
    environment variable UNITE_TRUST_PICKLE=1 decides, so the trainer's resume can opt in)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if trust_pickle is None:
        trust_pickle = trust_pickle_from_env(TRUST_PICKLE_ENV)
    try:
        return load_torch_file(path, f"{TRUST_PICKLE_ENV}=1", trust_pickle)
    except UntrustedPickleError:
        raise
    except Exception as error:
        raise ValueError(f"checkpoint {path} cannot be read ({error}); it may be corrupt") from error


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to `<name>.unreadable` (`.unreadable.1`, ... when taken):
    out of `list_checkpoints` and keep-last pruning, yet kept for inspection."""
    target = path.with_name(path.name + UNREADABLE_SUFFIX)
    count = 0
    while target.exists():
        count += 1
        target = path.with_name(f"{path.name}{UNREADABLE_SUFFIX}.{count}")
    os.replace(path, target)
    return target


def load_newest_readable(
    directory: str | Path, warn: Callable[[str], None], max_step: int | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `directory` (at most at `max_step` when given) that loads, with
    its contents; None when the folder holds no such checkpoint. Each newer one that fails to load
    is set aside, with one `warn` line. Raises CheckpointError when none loads."""
    found = [p for p in list_checkpoints(directory) if max_step is None or checkpoint_step(p) <= max_step]
    moved = []
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except ValueError as error:
            moved.append(set_aside(path))
            warn(f"{_first_line(error)}; moved it aside to {moved[-1].name} and trying the one before it")
    if not found:
        return None
    raise CheckpointError(
        f"none of the {len(found)} checkpoints in {directory} can be read (moved aside as *{UNREADABLE_SUFFIX}); "
        f"restore a good step_*.pt there to resume, or remove the folder to start afresh"
    )


def _first_line(error: Exception) -> str:
    """Errors from torch.load can run over many lines; a warning keeps one."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def capture_rng_state() -> dict[str, Any]:
    """Every global random state this process draws from: python, numpy, torch CPU and CUDA."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state (CUDA state goes to the current device)."""
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        if not torch.cuda.is_available():
            raise RuntimeError("the checkpoint holds a CUDA random state but CUDA is not available")
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate wants nested tuples; a serialised state may come back with lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def export_ema(checkpoint: str | Path, out_path: str | Path) -> tuple[Path, Path]:
    """Write the EMA weights of a training checkpoint as `out_path` (safetensors) and the model
    config next to it (same name, .json), for sampling without the training state. Both hold the
    run's history (the checkpoint's segments: steps, GPU count, settings, code version)."""
    state = load_checkpoint(checkpoint)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "model_config": state["config"]["model"],
        "step": state["step"],
        "epoch": state["epoch"],
        "ema_decay": state["config"]["ema_decay"],
        "source_checkpoint": str(checkpoint),
        "history": state.get("history", []),
    }
    save_file(exported_tensors(state["ema"]), str(out_path), metadata={"unite": json.dumps(info)})
    json_path = out_path.with_suffix(".json")
    json_path.write_text(json.dumps(info, indent=2) + "\n")
    return out_path, json_path


def exported_tensors(ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA state as the export stores it: every tensor contiguous, as safetensors needs."""
    return {name: tensor.contiguous() for name, tensor in ema.items()}


def load_exported(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The EMA state dict and model config of an export_ema file (LPIPS keys are not in it:
    load with strict=False or build the model with perceptual_weight=0)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EMA export {path} does not exist")
    info = json.loads(path.with_suffix(".json").read_text())
    return load_file(str(path)), ModelConfig.from_dict(info["model_config"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unite.checkpoint", description="Export EMA weights of a training checkpoint."
    )
    parser.add_argument("checkpoint", help="a step_*.pt file, or a folder (its latest checkpoint)")
    parser.add_argument("out", help="output .safetensors path (the config goes next to it as .json)")
    args = parser.parse_args(argv)
    source = Path(args.checkpoint)
    if source.is_dir():
        found = latest_checkpoint(source)
        if found is None:
            parser.error(f"{source} holds no complete checkpoint (step_*.pt)")
        source = found
    weights, config = export_ema(source, args.out)
    print(f"exported EMA of {source} to {weights} and {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
