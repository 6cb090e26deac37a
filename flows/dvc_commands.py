"""The DVC commands the flow runs, and what their output says.

Each command runs as `python -m dvc ...` in its own process group (`flows.processes`), in the
repository root. A failure is transient, worth retrying, when DVC could not take the repository
lock ("Unable to acquire lock": another DVC process runs in this workspace), or when the stage's
command or DVC itself was killed by SIGKILL/SIGTERM (OOM killer, preemption; a resumable train
stage continues from its checkpoint); any other failure is not.

The plan is what `dvc repro [target]` would visit: `plan_repro` over the active stage graph read
from dvc.yaml, in a subprocess; independent stages keep their dvc.yaml order. Params overrides are
written by DVC's own `--set-param` code (`to_path_overrides` + `apply_overrides`, the functions
`dvc exp run -S` calls), under the repository lock. (This module is not named `dvc.py`: Prefect
puts `flows/` first on `sys.path` when it loads `flows/pipeline.py` by path, where such a file
would hide the `dvc` package.)
"""

import json
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.processes import KILL_GRACE_S, run_streamed
from unite.report import flatten

LOCK_MESSAGE = "Unable to acquire lock"
TRANSIENT_SIGNALS = (signal.SIGKILL, signal.SIGTERM)

ParamValue = str | int | float | bool

# Runs in the repository root, where DVC resolves targets: prints `dvc repro [target]`'s plan,
# each stage's params and, with --changed, whether it is out of date (null: the DVC lock is held).
_PLAN_SCRIPT = """
import json, os, sys
from dvc.lock import LockError
from dvc.repo import Repo
from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro
check, targets = sys.argv[1] == "--changed", sys.argv[2:] or ["dvc.yaml"]
with Repo() as repo:
    stages = collect_stages(repo, targets)
    plan = plan_repro(get_active_graph(repo.index.graph), stages)
    changed = {}
    if check:
        try:
            with repo.lock:
                changed = {s.addressing: bool(s.changed()) for s in plan}
        except LockError:
            pass
    print(json.dumps([
        {"stage": s.addressing, "outs": [os.path.relpath(o.fs_path) for o in s.outs],
         "metrics": [os.path.relpath(o.fs_path) for o in s.outs if o.metric],
         "params": [[os.path.relpath(p.fs_path), key] for p in s.params for key in p.params or [""]],
         "changed": changed.get(s.addressing)}
        for s in plan
    ]))
"""

_STAGE_EXIT = re.compile(r", exited with (-?\d+)\s*$")
_OUTCOMES = (
    ("Running stage '", "ran"),
    ("didn't change, skipping", "up to date"),
    ("is cached - skipping run", "restored from run-cache"),
)


class DvcError(RuntimeError):
    """A DVC command failed; the message names the command or stage and why."""


class TransientDvcError(DvcError):
    """A failure worth retrying: the repository lock was held, or a process was killed."""


@dataclass(frozen=True)
class PlannedStage:
    name: str
    outs: tuple[str, ...]
    params: tuple[tuple[str, str], ...] = ()  # (params file, key; "" for the whole file)
    changed: bool | None = None  # out of date; None: not checked, or DVC's lock was held
    metrics: tuple[str, ...] = ()  # the outs that dvc.yaml declares as metrics


@dataclass(frozen=True)
class StageResult:
    name: str
    outcome: str
    seconds: float


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


@dataclass
class DvcOutput:
    """What a DVC command's output says: how a stage ended and whether a failure is transient."""

    tail: deque[str]
    outcome: str = "done"
    lock_held: bool = False
    stage_status: int | None = None

    def feed(self, line: str) -> None:
        self.tail.append(line)
        for marker, outcome in _OUTCOMES:
            if marker in line:
                self.outcome = outcome
        if LOCK_MESSAGE in line:
            self.lock_held = True
        if match := _STAGE_EXIT.search(line):
            self.stage_status = int(match.group(1))

    def error(self, what: str, returncode: int) -> DvcError:
        """The exception for a failed command, transient or not, naming `what` and the rule."""
        last = "\n".join(self.tail)
        signals = {int(s) for s in TRANSIENT_SIGNALS}
        # A shell reports a killed child as 128 + signal, Popen as -signal.
        killed = {-s for s in signals} | {128 + s for s in signals}
        if -returncode in signals:
            reason = f"dvc was killed by {signal.Signals(-returncode).name}"
        elif self.lock_held:
            reason = "the DVC repository lock is held by another DVC process"
        elif self.stage_status in killed:
            reason = f"the stage command was killed (exit status {self.stage_status})"
        else:
            return DvcError(f"{what} failed (dvc exit code {returncode}); not retried:\n{last}")
        return TransientDvcError(f"{what}: transient failure, {reason}; may be retried:\n{last}")


def run_dvc(
    args: Sequence[str],
    what: str,
    root: Path,
    on_line: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    kill_grace_s: float = KILL_GRACE_S,
    tick: Callable[[], None] | None = None,
) -> DvcOutput:
    """`dvc <args>` in `root`, its lines fed to `on_line`; raises `DvcError` (transient or not),
    naming `what`, when it fails."""
    output = DvcOutput(tail=deque(maxlen=20))

    def feed(line: str) -> None:
        output.feed(line)
        on_line(line)

    returncode = run_streamed(_dvc(*args), root, feed, env=env, kill_grace_s=kill_grace_s, tick=tick)
    if returncode != 0:
        raise output.error(what, returncode)
    return output


def read_plan(root: Path, target: str | None, kill_grace_s: float = KILL_GRACE_S,
              check_changed: bool = False) -> list[PlannedStage]:
    """The stages `dvc repro [target]` would visit, in DVC's order (target's upstream included),
    with whether each is out of date when `check_changed`."""
    lines: list[str] = []
    what = f"planning target {target!r}" if target else "planning dvc.yaml"
    args = ["-c", _PLAN_SCRIPT, "--changed" if check_changed else "--", *([target] if target else [])]
    returncode = run_streamed([sys.executable, *args], root, lines.append, kill_grace_s=kill_grace_s)
    if returncode != 0:
        raise DvcError(f"{what} failed (exit code {returncode}):\n" + "\n".join(lines[-20:]))
    plan = [PlannedStage(item["stage"], tuple(item["outs"]), tuple(map(tuple, item["params"])), item["changed"],
                         tuple(item["metrics"]))
            for item in json.loads(lines[-1])]
    if not plan:
        raise DvcError(f"{what}: DVC found no stages to run in {root}")
    return plan


def _override(key: str, value: ParamValue) -> str:
    """One `-S` argument; strings pass verbatim so `--set k=v` parses exactly as `dvc exp run -S`."""
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def apply_params(root: Path, params: Mapping[str, ParamValue], exp_name: str) -> list[str]:
    """Write `-S` overrides into the params files as `dvc exp run -S` does, after checking that
    experiment `exp_name` is free; returns the overrides."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.repo.experiments.refs import ExpRefInfo
    from dvc.repo.experiments.utils import check_ref_format
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    overrides = [_override(key, value) for key, value in params.items()]
    with Repo(str(root)) as repo:
        ref = ExpRefInfo(repo.scm.get_rev(), exp_name)
        check_ref_format(repo.scm, ref)
        if repo.scm.get_ref(str(ref)):
            raise ValueError(
                f"exp_name {exp_name!r}: an experiment of that name already exists on this commit; "
                "DVC experiment names are unique per baseline commit"
            )
        try:
            with repo.lock:
                for path, path_overrides in to_path_overrides(overrides).items():
                    try:
                        apply_overrides(root / path, path_overrides)
                    except InvalidArgumentError as exc:
                        raise ValueError(
                            f"flow params {path_overrides} for {path}: {exc.__cause__ or exc}"
                        ) from exc
        except LockError as exc:
            raise TransientDvcError(f"set-params: transient failure, {exc}") from exc
    return overrides


def untracked(root: Path, paths: Sequence[str]) -> list[str]:
    """The files under `paths` that git neither tracks nor ignores."""
    if not paths:
        return []
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z", "--", *paths],
                            cwd=root, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name]


def metrics_show(
    root: Path, kill_grace_s: float = KILL_GRACE_S
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """`dvc metrics show --json`: the metrics per file as dotted keys, and the files DVC could
    not read with its message."""
    lines: list[str] = []
    run_dvc(["metrics", "show", "--json"], "dvc metrics show", root, lines.append, kill_grace_s=kill_grace_s)
    # The JSON is one line; DVC's warnings (stderr, merged here) are not.
    shown = json.loads(next((ln for ln in lines if ln.startswith("{")), "{}")).get("", {}).get("data", {})
    metrics = {f: flatten(entry["data"]) for f, entry in shown.items() if "data" in entry}
    unreadable = {f: entry["error"].get("msg", "") for f, entry in shown.items() if "error" in entry}
    return metrics, unreadable
