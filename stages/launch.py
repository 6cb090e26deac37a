"""Expected failures as one line, the stages' command lines, and the torchrun launcher of the
multi-process stages.

An expected failure is a bad param, a missing file or an unreadable input: an exception of one of
the project's own classes (`ConfigError`, `DataError`, ...), or `FileNotFoundError`. Each stage's
`__main__` runs under `run_stage`, which prints such a failure as one line on stderr,
`error: <stage>: <message>; <what to do>`, and exits 1; any other exception is a bug and keeps its
traceback.

Each stage takes every path it reads or writes as a named option from its `cmd` in dvc.yaml
(`StageArguments`), so dvc.yaml is the one place that says where data lives. A wrong command line
and a missing input are expected failures that name the option and the path.

    python -m stages.launch train --shards data/shards ...     # likewise sweep, evaluate

validates params.yaml, then runs `torchrun --standalone --nproc-per-node <section.nproc_per_node>
-m stages.<stage> --shards data/shards ...` in this process (`torch.distributed.run`): every rank
gets the stage's options. Workers hand their expected failure to the launcher instead of printing
it, so that N ranks failing alike give one line and torchrun's error report is left out; a worker
stopped by a signal (a preempted training run) makes the launcher exit with that worker's status;
anything else is reported by torchrun as usual, with the worker's traceback.

Inside a Slurm job written by `stages.slurm` (which sets UNITE_SRUN), the same command starts one
launcher per task of the allocation with `srun` (a task per node), and each runs torchrun with a c10d
rendezvous on the first node (this one): `--nnodes <tasks> --nproc-per-node <section.nproc_per_node>`.
The ranks' failure files then lie in .dvc/tmp, which every node sees. Slurm signals every process
of a job step at once, so those launchers leave SIGTERM to their workers instead of passing on a
second one (a second SIGTERM stops training without a checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from stages.params import PARAMS_FILE, load_stage_params
from unite.config import ConfigError

# Where a worker started by `launch` leaves its expected failure (one file per rank).
FAILURE_DIR_ENV = "UNITE_STAGE_FAILURES"
# Set by a Slurm batch script: start the workers across the allocation with srun.
SRUN_ENV = "UNITE_SRUN"
# host:port of the c10d rendezvous, set for the launchers srun starts.
RENDEZVOUS_ENV = "UNITE_RENDEZVOUS"
EXPECTED_EXIT = 1
TORCHRUN_STAGES = ("train", "sweep", "evaluate")
_PROJECT_PACKAGES = ("unite", "stages")


def is_expected(error: BaseException) -> bool:
    """Whether `error` is a failure the user can fix from its message (not a bug)."""
    return isinstance(error, FileNotFoundError) or type(error).__module__.split(".")[0] in _PROJECT_PACKAGES


def failure_line(stage: str, error: BaseException) -> str:
    """`error: <stage>: <message>; <what to do>` on one line."""
    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
    if isinstance(error, ConfigError):
        message += f"; fix it in {PARAMS_FILE} and rerun"
    elif isinstance(error, FileNotFoundError):
        message += "; check the path, or run the stages that write it first (`dvc repro`)"
    return f"error: {stage}: {message}"


class UsageError(Exception):
    """A stage's command line does not match its options (a wrong `cmd` in dvc.yaml)."""


class PathOption(NamedTuple):
    option: str  # "--shards"
    kind: str  # "file" or "folder"
    is_input: bool  # read by the stage (a dvc.yaml dep), else written (an out)


class StageArguments(argparse.ArgumentParser):
    """A stage's options: every path it reads (`add_input`, which must exist) or writes
    (`add_output`), all required. Errors raise `UsageError` (one line under `run_stage`) instead of
    printing the usage and exiting, so that torchrun's ranks report them like any expected failure."""

    def __init__(self, module: str, doc: str) -> None:
        super().__init__(prog=f"python -m {module}", description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.path_options: dict[str, PathOption] = {}  # by the attribute name of its value

    def _add_path(self, option: str, kind: str, is_input: bool, help: str) -> None:
        if kind not in ("file", "folder"):
            raise ValueError(f"{option}: kind must be 'file' or 'folder', got {kind!r}")
        action = self.add_argument(option, type=Path, required=True, metavar=kind.upper(), help=help)
        self.path_options[action.dest] = PathOption(option, kind, is_input)

    def add_input(self, option: str, kind: str, help: str) -> None:
        """A path the stage reads; it must exist and be a `kind` ("file" or "folder")."""
        self._add_path(option, kind, True, help)

    def add_output(self, option: str, kind: str, help: str) -> None:
        """A path the stage writes; if it exists, it must be a `kind` ("file" or "folder")."""
        self._add_path(option, kind, False, help)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; usage: {self.format_usage().removeprefix('usage: ').strip()}")

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        """The options of `argv` (default: the command line), each path checked."""
        args = self.parse_args(argv)
        for dest, (option, kind, is_input) in self.path_options.items():
            path: Path = getattr(args, dest)
            if is_input and not path.exists():
                raise FileNotFoundError(f"{option} {path}: no such {kind}")
            if path.exists() and path.is_dir() != (kind == "folder"):
                found = "folder" if path.is_dir() else "file"
                raise UsageError(f"{option} {path}: must be a {kind}, but it is a {found}")
        return args


def _stage_name() -> str:
    return Path(sys.argv[0]).stem


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`; an expected failure becomes one line and exit status 1."""
    try:
        main()
    except Exception as error:
        if not is_expected(error):
            raise
        line = failure_line(_stage_name(), error)
        failure_dir = os.environ.get(FAILURE_DIR_ENV)
        if failure_dir:
            Path(failure_dir, f"rank{os.environ.get('RANK', '0')}").write_text(line)
        else:
            print(line, file=sys.stderr)
        sys.exit(EXPECTED_EXIT)


class _HeldRecords(logging.Handler):
    """Stands in for a logger's handlers and keeps its records until it is known whether they
    are worth showing (torchrun's warnings and its error report are not, for an expected failure)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger, self.handlers = logger, list(logger.handlers)
        self.records: list[logging.LogRecord] = []

    def __enter__(self) -> _HeldRecords:
        self.logger.handlers = [self]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.logger.handlers = self.handlers

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        for record in self.records:
            for handler in self.handlers:
                handler.handle(record)


def _signal_status(exitcode: int) -> int | None:
    """The shell's exit status of a worker stopped by a signal, or that exited as if it was."""
    if exitcode < 0:
        return 128 - exitcode
    return exitcode if exitcode > 128 else None


def _torchrun_options(nproc: int) -> list[str]:
    """One node on its own, or (under srun) this task's share of a c10d rendezvous of every task."""
    endpoint = os.environ.get(RENDEZVOUS_ENV)
    if not endpoint:
        return ["--standalone", "--nproc-per-node", str(nproc)]
    return ["--nnodes", os.environ["SLURM_STEP_NUM_TASKS"], "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            # Slurm sends SIGTERM to the workers itself: torchrun must neither pass on a second one nor die.
            "--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT",
            "--rdzv-id", f"{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _launch_with_srun(stage: str, stage_args: list[str]) -> int:
    """Run this launcher once per task of the Slurm allocation; a failing task ends the others.
    Returns srun's status, or 1 with the ranks' expected failures printed once."""
    shared = Path(".dvc/tmp") if Path(".dvc/tmp").is_dir() else Path.cwd()
    with tempfile.TemporaryDirectory(prefix="unite-failures-", dir=shared) as failure_dir:
        env = {**os.environ, FAILURE_DIR_ENV: str(Path(failure_dir).resolve()),
               RENDEZVOUS_ENV: f"{socket.gethostname()}:{_free_port()}"}
        command = ["srun", "--kill-on-bad-exit=1", sys.executable, "-m", "stages.launch", stage, *stage_args]
        # Slurm signals the step's processes itself; this process waits for them to finish.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        returncode = subprocess.run(command, env=env).returncode
        lines = sorted({p.read_text() for p in Path(failure_dir).iterdir()})
    if lines:
        print("\n".join(lines), file=sys.stderr)
        return EXPECTED_EXIT
    return returncode


def launch(stage: str, stage_args: list[str]) -> int:
    """Validate params, then run the stage's module with `stage_args` under torchrun; returns the
    exit status. The ranks check the arguments (a wrong one is one line, as any expected failure)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        nproc = load_stage_params(stage)[stage]["nproc_per_node"]
    except ConfigError as error:
        print(failure_line(stage, error), file=sys.stderr)
        return EXPECTED_EXIT
    if os.environ.get(SRUN_ENV) and not os.environ.get(RENDEZVOUS_ENV):
        return _launch_with_srun(stage, stage_args)
    under_srun = bool(os.environ.get(RENDEZVOUS_ENV))
    if under_srun:
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # see _torchrun_options
    # Under srun the caller made the failure folder, on a filesystem every node sees.
    failure_folder = (contextlib.nullcontext(os.environ[FAILURE_DIR_ENV]) if under_srun
                      else tempfile.TemporaryDirectory(prefix="unite-failures-"))
    with _HeldRecords(logging.getLogger("torch.distributed")) as held, failure_folder as failure_dir:
        os.environ[FAILURE_DIR_ENV] = failure_dir
        try:
            torchrun_args = parse_args([*_torchrun_options(nproc), "-m", f"stages.{stage}"])
            # Set after parsing: torchrun's parser would take a stage option that abbreviates one
            # of its own options (as --log would --log-dir) for its own.
            torchrun_args.training_script_args = stage_args
            run(torchrun_args)
        except ChildFailedError as failed:
            if any(Path(failure_dir).iterdir()):
                if not under_srun:  # else the srun caller prints every task's lines once
                    print("\n".join(sorted({p.read_text() for p in Path(failure_dir).iterdir()})), file=sys.stderr)
                return EXPECTED_EXIT
            held.replay()
            statuses = [_signal_status(f.exitcode) for f in failed.failures.values()]
            if all(statuses):
                return statuses[0]
            raise
        except SignalException as stopped:  # the launcher itself was told to stop
            held.replay()
            return 128 + int(stopped.sigval)
        finally:
            del os.environ[FAILURE_DIR_ENV]
        held.replay()
        return 0


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TORCHRUN_STAGES:
        sys.exit(f"usage: python -m stages.launch {{{','.join(TORCHRUN_STAGES)}}} [the stage's options]")
    sys.exit(launch(sys.argv[1], sys.argv[2:]))


if __name__ == "__main__":
    main()
