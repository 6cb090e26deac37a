"""Run the repository's DVC pipeline as a Prefect flow: one task per DVC stage.

DVC owns the pipeline and the cache; Prefect adds scheduling, retries, live logs and artifacts.

Stage order
    DVC plans the run exactly as `dvc repro [target]` would (`plan_repro` over the active stage
    graph read from dvc.yaml), in a subprocess in the repository root; independent stages keep
    their dvc.yaml order. Each stage then runs as its own task, `dvc repro --single-item <stage>`,
    so DVC still decides whether the stage is up to date: a second run reruns nothing. Prefect
    caching is off for every task; DVC is the cache.

Parameters
    `params={"train.lr": 0.001}` means what `dvc exp run -S train.lr=0.001` means in the
    workspace, in three steps:
    1. before planning (a `matrix:` over a params list changes the stages), the overrides are
       written into the params files by DVC's own `--set-param` code (`to_path_overrides` +
       `apply_overrides`, the functions `dvc exp run -S` calls), under the DVC repository lock,
       after checking that the experiment name is free;
    2. the stages run one task each, as above, with `DVC_EXP_NAME` set as `dvc exp run` sets it;
    3. `dvc exp save -n <name> <stages>` records the result as one experiment, so
       `dvc exp show`, `dvc params diff` and `dvc metrics diff` list it like any other. The
       planned stages' outputs that git neither tracks nor ignores (dvc.lock's uncached metrics
       and plots, never committed in a fresh clone) are included, as `dvc exp run` includes them.
    The experiment is named after the Prefect flow run unless `exp_name` is given. One
    `dvc exp run -S` task would produce the same experiment but hide the stages inside a single
    task: no per-stage states, logs or retries. As with `dvc exp run`, the overrides stay in the
    workspace's params files after the run.

Processes
    Every DVC command runs in its own session (process group). Its merged stdout/stderr is sent
    line by line to the Prefect run logger as it arrives (`PYTHONUNBUFFERED=1` for Python stage
    commands; carriage-return progress bars keep their last state). When the command must stop
    early (flow cancelled: the runner's SIGTERM reaches the flow as `TerminationSignal`; task
    timeout; Ctrl-C) the whole group gets SIGTERM and, after `kill_grace_s`, SIGKILL, so
    `torchrun` workers die with it. Processes a stage leaves behind after DVC exits are stopped
    the same way.

One training run per node
    A run that may train (its plan holds the train stage, and that stage or one planned before it
    is out of date, DVC's lock hides whether it is, or the run sets a param they read) first takes
    a slot of the Prefect global concurrency limit `unite-train-<host name>` (`train_limit`),
    created with one slot if missing, and holds it until its experiment is saved: a second
    training run on the node waits in the limit's queue instead of failing on DVC's lock.
    Evaluation-only runs take no slot (unless started while a stage of the workspace holds DVC's
    lock) and retry on the lock as before.

Retries
    Only transient failures are retried (`retries`, `retry_delay_s`): DVC could not take the
    repository lock ("Unable to acquire lock": another DVC process runs in this workspace), or the
    stage's command or DVC itself was killed by SIGKILL/SIGTERM (OOM killer, preemption; a
    resumable train stage continues from its checkpoint). Any other failure, and a task timeout,
    fails the flow at once.

Artifacts
    While the train stage runs, `unite-train-progress` shows step / max steps, loss and images/s
    from the stage's metrics file in dvc.yaml (the trainer rewrites it at every log interval).
    After the stages: a markdown summary (`unite-summary`: plan, what each stage did, params,
    experiment, metrics, sample-grid paths) and a table of `dvc metrics show --json`
    (`unite-metrics`). Image artifacts only render public URLs, so grids (image files among the
    planned stages' outputs) are published as paths on the host that ran the flow. The summary
    also links reports/report.html and shows the report's sample grid small, as a data: URI.

CLI
    python -m flows.pipeline run [--target evaluate] [--set train.lr=0.001 ...] [--exp-name N]
    python -m flows.pipeline serve --cron "0 3 * * *" [--name unite-nightly] [--target ...]
"""

import argparse
import base64
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from PIL import Image
from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import TaskRun
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import State
from prefect.tasks import Task

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOW_NAME = "unite-pipeline"
SUMMARY_KEY = "unite-summary"
METRICS_KEY = "unite-metrics"
KILL_GRACE_S = 10.0
LOCK_MESSAGE = "Unable to acquire lock"
TRANSIENT_SIGNALS = (signal.SIGKILL, signal.SIGTERM)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg"})
MAX_IMAGES_PER_OUT = 20
REPORT = Path("reports/report.html")
REPORT_GRID = Path("reports/figures/samples.png")
PREVIEW_SIDE = 480
POLL_S = 0.2
TRAIN_STAGE = "train"  # its metrics file (dvc.yaml) holds the latest log row, kept current while it runs
PROGRESS_KEY = "unite-train-progress"
PROGRESS_EVERY_S = 5.0
TRAIN_LIMIT = "unite-train-{host}"  # the Prefect concurrency limit that queues training on one node

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


# ---------------------------------------------------------------- subprocesses and groups


def _terminal_line(raw: bytes) -> str:
    """What a terminal would show for one output line: the text after the last carriage return."""
    segments = [s for s in raw.decode("utf-8", "replace").rstrip("\r\n").split("\r") if s]
    return segments[-1] if segments else ""


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(_terminal_line(raw))
    lines.put(None)


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the group (zombies wait for a reaper)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Reap the leader and wait up to `seconds` for the group to empty; True if it did."""
    deadline = time.monotonic() + seconds
    while True:
        proc.poll()
        if not _group_alive(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _stop_group(proc: subprocess.Popen[bytes], kill_grace_s: float) -> bool:
    """SIGTERM the process group, SIGKILL it after the grace period; True if it was running."""
    proc.poll()
    if not _group_alive(proc.pid):
        return False
    for sig, wait_s in ((signal.SIGTERM, kill_grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if _wait_group(proc, wait_s):
            break
    return True


def run_streamed(
    cmd: Sequence[str],
    cwd: Path,
    on_line: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    kill_grace_s: float = KILL_GRACE_S,
    tick: Callable[[], None] | None = None,
) -> int:
    """Run `cmd` in a new session, feed each output line to `on_line`, return the exit code.

    The group is stopped (SIGTERM, then SIGKILL) if anything interrupts the wait, and when
    processes outlive the leader. Waiting polls a queue so that Prefect's timeout and
    cancellation exceptions are delivered promptly even when the command prints nothing;
    `tick` is called at every poll and line.
    """
    proc = subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        while True:
            if tick is not None:
                tick()
            try:
                line = lines.get(timeout=POLL_S)
            except queue.Empty:
                if proc.poll() is not None and _stop_group(proc, kill_grace_s):
                    on_line("(stopped the processes the command left running)")
                continue
            if line is None:
                return proc.wait()
            if line.strip():
                on_line(line)
    finally:
        _stop_group(proc, kill_grace_s)
        reader.join(timeout=5.0)
        if not reader.is_alive():  # else a process that survived SIGKILL holds the pipe
            proc.stdout.close()


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


@dataclass
class _DvcOutput:
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


def _run_dvc(
    args: Sequence[str],
    what: str,
    root: Path,
    on_line: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    kill_grace_s: float = KILL_GRACE_S,
    tick: Callable[[], None] | None = None,
) -> _DvcOutput:
    output = _DvcOutput(tail=deque(maxlen=20))

    def feed(line: str) -> None:
        output.feed(line)
        on_line(line)

    returncode = run_streamed(_dvc(*args), root, feed, env=env, kill_grace_s=kill_grace_s, tick=tick)
    if returncode != 0:
        raise output.error(what, returncode)
    return output


def _retry_transient(_task: Task[..., Any], _task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect retry condition: only `TransientDvcError` is worth another attempt."""
    return isinstance(state.result(raise_on_failure=False), TransientDvcError)


_TASK_OPTIONS: dict[str, Any] = dict(
    cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=_retry_transient
)


# ---------------------------------------------------------------- tasks


@task(name="plan", **_TASK_OPTIONS)
def plan_stages(
    repo_dir: str, target: str | None, kill_grace_s: float = KILL_GRACE_S, check_changed: bool = False
) -> list[PlannedStage]:
    """The stages `dvc repro [target]` would visit, in DVC's order (target's upstream included),
    with whether each is out of date when `check_changed`."""
    lines: list[str] = []
    what = f"planning target {target!r}" if target else "planning dvc.yaml"
    args = ["-c", _PLAN_SCRIPT, "--changed" if check_changed else "--", *([target] if target else [])]
    returncode = run_streamed([sys.executable, *args], Path(repo_dir), lines.append,
                              kill_grace_s=kill_grace_s)
    if returncode != 0:
        raise DvcError(f"{what} failed (exit code {returncode}):\n" + "\n".join(lines[-20:]))
    plan = [PlannedStage(item["stage"], tuple(item["outs"]), tuple(map(tuple, item["params"])), item["changed"],
                         tuple(item["metrics"]))
            for item in json.loads(lines[-1])]
    if not plan:
        raise DvcError(f"{what}: DVC found no stages to run in {repo_dir}")
    get_run_logger().info("DVC plan: %s", " -> ".join(s.name for s in plan))
    return plan


def _override(key: str, value: ParamValue) -> str:
    """One `-S` argument; strings pass verbatim so `--set k=v` parses exactly as `dvc exp run -S`."""
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


@task(name="set-params", **_TASK_OPTIONS)
def set_params(repo_dir: str, params: dict[str, ParamValue], exp_name: str) -> list[str]:
    """Apply `-S` overrides to the params files as `dvc exp run -S` does; returns them."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.repo.experiments.refs import ExpRefInfo
    from dvc.repo.experiments.utils import check_ref_format
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    overrides = [_override(key, value) for key, value in params.items()]
    root = Path(repo_dir)
    with Repo(repo_dir) as repo:
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
    get_run_logger().info("params set as by `dvc exp run -S`: %s", " ".join(overrides))
    return overrides


class _TrainProgress:
    """The `unite-train-progress` artifact: step / max steps, loss and images/s of the train stage,
    read from its metrics file whenever that changed, at most every PROGRESS_EVERY_S."""

    def __init__(self, root: Path, metrics: str) -> None:
        self.metrics, self.params = root / metrics, root / "params.yaml"
        self.seen = self._mtime()
        self.next_s = 0.0
        self.artifact = create_progress_artifact(0.0, key=PROGRESS_KEY, description="training: no step logged yet")

    def _mtime(self) -> int | None:
        try:
            return self.metrics.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if now < self.next_s and not force:
            return
        self.next_s = now + PROGRESS_EVERY_S
        mtime = self._mtime()
        if mtime is None or mtime == self.seen:
            return
        try:
            row = json.loads(self.metrics.read_text())
            max_steps = row.get("max_steps") or yaml.safe_load(self.params.read_text())["train"]["max_steps"]
            step = row["step"]
        except (OSError, ValueError, KeyError, TypeError):  # mid-write or not a training row yet
            return
        self.seen = mtime
        update_progress_artifact(
            self.artifact, min(100.0, 100.0 * step / max_steps),
            description=f"training: step {step} / {max_steps}, loss {row.get('loss', float('nan')):.4g}, "
                        f"{row.get('images_per_s', float('nan')):.1f} images/s",
        )


def _progress_file(stage: PlannedStage) -> str | None:
    """The train stage's metrics file (its only one in dvc.yaml), which the trainer keeps current."""
    return stage.metrics[0] if stage.name == TRAIN_STAGE and stage.metrics else None


@task(name="stage", task_run_name="{stage}", **_TASK_OPTIONS)
def run_stage(stage: str, repo_dir: str, env: dict[str, str], kill_grace_s: float = KILL_GRACE_S,
              progress_file: str | None = None) -> StageResult:
    """`dvc repro --single-item <stage>`; DVC skips it when nothing it depends on changed. While it
    runs, the training rows in `progress_file` (if given) feed the progress artifact."""
    logger = get_run_logger()
    start = time.monotonic()
    progress = _TrainProgress(Path(repo_dir), progress_file) if progress_file else None
    output = _run_dvc(["repro", "--single-item", stage], f"stage {stage!r}", Path(repo_dir),
                      logger.info, env=env, kill_grace_s=kill_grace_s, tick=progress.update if progress else None)
    if progress is not None:
        progress.update(force=True)
    result = StageResult(stage, output.outcome, round(time.monotonic() - start, 1))
    logger.info("stage %r: %s in %.1f s", stage, result.outcome, result.seconds)
    return result


def _untracked(root: Path, paths: Sequence[str]) -> list[str]:
    """The files under `paths` that git neither tracks nor ignores."""
    if not paths:
        return []
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "-z", "--", *paths],
                            cwd=root, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name]


@task(name="save-experiment", **_TASK_OPTIONS)
def save_experiment(
    repo_dir: str, exp_name: str, plan: list[PlannedStage], kill_grace_s: float = KILL_GRACE_S
) -> None:
    """`dvc exp save`: record the workspace (params, dvc.lock, metrics) as experiment `exp_name`.

    `dvc exp save` leaves out files that were already untracked when it ran, which after a first
    `dvc repro` in a fresh clone are exactly the uncached metrics and plots. Like `dvc exp run`,
    the experiment includes the untracked, not ignored outputs of the planned stages.
    """
    root = Path(repo_dir)
    include = _untracked(root, [out for stage in plan for out in stage.outs])
    _run_dvc(["exp", "save", "-n", exp_name, *(arg for path in include for arg in ("-I", path)),
              *(stage.name for stage in plan)],
             f"saving experiment {exp_name!r}", root, get_run_logger().info, kill_grace_s=kill_grace_s)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _grids(root: Path, plan: Sequence[PlannedStage]) -> list[tuple[str, str]]:
    """(stage, path) of the image files among the planned stages' outputs, capped per output."""
    found: list[tuple[str, str]] = []
    for stage in plan:
        for out in stage.outs:
            path = root / out
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            found += [(stage.name, str(p.relative_to(root))) for p in images[:MAX_IMAGES_PER_OUT]]
            if len(images) > MAX_IMAGES_PER_OUT:
                found.append((stage.name, f"{out}/ ({len(images) - MAX_IMAGES_PER_OUT} more images)"))
    return found


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _report_section(root: Path) -> list[str]:
    """A link to the run's self-contained report and a small copy of its sample grid, inline as a
    data: URI (the UI renders those; it cannot show paths on the host)."""
    report = root / REPORT
    if not report.is_file():
        return ["## Report", f"`{REPORT}` not found (no report stage ran)."]
    parts = ["## Report", f"[{report}]({report.as_uri()}): one self-contained page; open it on the host above "
             "(browsers do not follow file links from a web page: copy the path)."]
    if (root / REPORT_GRID).is_file():
        with Image.open(root / REPORT_GRID) as grid:
            grid.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
            png = io.BytesIO()
            grid.save(png, format="PNG")
        parts.append(f"![sample grid](data:image/png;base64,{base64.b64encode(png.getvalue()).decode()})")
    return parts


@task(name="publish", **_TASK_OPTIONS)
def publish(
    repo_dir: str,
    plan: list[PlannedStage],
    results: list[StageResult],
    target: str | None,
    overrides: list[str],
    exp_name: str | None,
    kill_grace_s: float = KILL_GRACE_S,
) -> dict[str, dict[str, Any]]:
    """Publish the metrics table and the markdown summary; return the metrics per file."""
    root = Path(repo_dir)
    lines: list[str] = []
    _run_dvc(["metrics", "show", "--json"], "dvc metrics show", root, lines.append,
             kill_grace_s=kill_grace_s)
    # The JSON is one line; DVC's warnings (stderr, merged here) are not.
    shown = json.loads(next((ln for ln in lines if ln.startswith("{")), "{}")).get("", {}).get("data", {})
    metrics = {f: _flatten(entry["data"]) for f, entry in shown.items() if "data" in entry}
    unreadable = {f: entry["error"].get("msg", "") for f, entry in shown.items() if "error" in entry}
    rows = [{"file": f, "metric": k, "value": v} for f, values in metrics.items() for k, v in values.items()]
    create_table_artifact(rows, key=METRICS_KEY, description=f"dvc metrics show, {root}")

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                         text=True, check=False).stdout.strip() or "unknown"
    grids = _grids(root, plan)
    parts = [
        f"# {FLOW_NAME}: `{flow_run.get_name()}`",
        f"- repository: `{root}` on `{socket.gethostname()}`, git `{rev}`",
        f"- target: `{target}` and its upstream stages" if target else "- target: all stages",
        f"- params: `{' '.join(overrides)}`, saved as DVC experiment `{exp_name}`"
        if overrides else "- params: the workspace's params files",
        "## Stages",
        _md_table(["stage", "result", "seconds"], [(r.name, r.outcome, r.seconds) for r in results]),
        "## Metrics",
        _md_table(["file", "metric", "value"], [(r["file"], r["metric"], r["value"]) for r in rows])
        if rows else "No metrics (top-level `metrics:` of dvc.yaml).",
        *[f"- `{f}` not readable: {msg}" for f, msg in unreadable.items()],
        "## Sample grids",
        "Paths relative to the repository on the host above.",
        _md_table(["stage", "path"], [(s, f"`{p}`") for s, p in grids]) if grids else "None found.",
        *_report_section(root),
    ]
    create_markdown_artifact("\n\n".join(parts), key=SUMMARY_KEY, description="pipeline run summary")
    return metrics


# ---------------------------------------------------------------- one training run per node


def _reads(stage: PlannedStage, override: str) -> bool:
    """Whether `stage` depends on the param that the `-S`-style key `[file:]section.key` sets."""
    path, _, key = override.rpartition(":")
    return any(
        (path or "params.yaml") == dep_path and (not dep or key == dep or key.startswith(f"{dep}.")
                                                 or dep.startswith(f"{key}."))
        for dep_path, dep in stage.params
    )


def may_train(plan: Sequence[PlannedStage], params: Mapping[str, ParamValue]) -> bool:
    """Whether a run may train: its plan holds the train stage, and that stage or one planned
    before it is out of date (or DVC's lock, held by a running stage, hides whether it is), or
    reads a param the run sets."""
    names = [stage.name for stage in plan]
    if TRAIN_STAGE not in names:
        return False
    upstream = plan[: names.index(TRAIN_STAGE) + 1]
    return any(stage.changed is not False or any(_reads(stage, key) for key in params) for stage in upstream)


@contextmanager
def training_slot(name: str) -> Iterator[None]:
    """Hold a slot of the Prefect global concurrency limit `name`, waiting in its queue; the limit
    is created with one slot when it does not exist yet (change it with `prefect gcl update`)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass
    logger = get_run_logger()
    logger.info("waiting for a slot of concurrency limit %r (one training run per node)", name)
    start = time.monotonic()
    with concurrency(name, occupy=1):
        logger.info("holding concurrency limit %r after %.1f s", name, time.monotonic() - start)
        yield


# ---------------------------------------------------------------- flow


@flow(name=FLOW_NAME)
def pipeline(
    target: str | None = None,
    params: dict[str, ParamValue] | None = None,
    exp_name: str | None = None,
    repo_dir: str | None = None,
    retries: int = 2,
    retry_delay_s: float = 60.0,
    stage_timeout_s: float | None = None,
    kill_grace_s: float = KILL_GRACE_S,
    train_limit: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the DVC stages up to `target` (all by default), then publish metrics and grids.

    `params` are `dvc exp run -S` overrides ({"train.lr": 0.001}); with them the run is saved as
    DVC experiment `exp_name` (default: this flow run's name). A run that may train first waits
    for the node's training slot, the Prefect concurrency limit `train_limit` (default
    `unite-train-<host name>`), and holds it until its experiment is saved. Returns the metrics
    per file.
    """
    root = str(Path(repo_dir).resolve() if repo_dir else REPO_ROOT)
    options: dict[str, Any] = dict(retries=retries, retry_delay_seconds=retry_delay_s)
    overrides: list[str] = []
    env: dict[str, str] = {}
    name = None
    plan = plan_stages.with_options(**options)(root, target, kill_grace_s, check_changed=True)
    slot = train_limit or TRAIN_LIMIT.format(host=socket.gethostname())
    with training_slot(slot) if may_train(plan, params or {}) else nullcontext():
        if params:  # before planning again: a `matrix:` over a params list changes the stages
            name = exp_name or str(flow_run.get_name())
            overrides = set_params.with_options(**options)(root, params, name)
            env["DVC_EXP_NAME"] = name
            plan = plan_stages.with_options(**options)(root, target, kill_grace_s)
        stage_task = run_stage.with_options(**options, timeout_seconds=stage_timeout_s)
        results = [stage_task(stage.name, root, env, kill_grace_s, _progress_file(stage)) for stage in plan]
        if name is not None:
            save_experiment.with_options(**options)(root, name, plan, kill_grace_s)
    return publish.with_options(**options)(root, plan, results, target, overrides, name, kill_grace_s)


# ---------------------------------------------------------------- CLI


def _parse_set(items: Sequence[str]) -> dict[str, ParamValue]:
    params: dict[str, ParamValue] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE as `dvc exp run -S` does, got {item!r}")
        params[key] = value
    return params


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the pipeline once")
    serve_p = sub.add_parser("serve", help="serve a deployment that runs the pipeline on a cron schedule")
    for p in (run_p, serve_p):
        p.add_argument("--target", help="stage to run with its upstream stages (default: all)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="param override, as `dvc exp run -S` (repeatable)")
        p.add_argument("--repo", help=f"DVC repository (default: {REPO_ROOT})")
        p.add_argument("--retries", type=int, default=2, help="retries of a transient failure")
        p.add_argument("--retry-delay", type=float, default=60.0, help="seconds between retries")
        p.add_argument("--stage-timeout", type=float, help="seconds before a stage is stopped")
    run_p.add_argument("--exp-name", help="DVC experiment name when --set is given")
    serve_p.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: %(default)s)")
    serve_p.add_argument("--name", default="unite-nightly", help="deployment name")
    args = parser.parse_args(argv)

    kwargs: dict[str, Any] = dict(
        target=args.target, params=_parse_set(args.set) or None, repo_dir=args.repo,
        retries=args.retries, retry_delay_s=args.retry_delay, stage_timeout_s=args.stage_timeout,
    )
    if args.command == "serve":
        # limit=1: two DVC runs in one workspace would only fight over the repository lock.
        pipeline.serve(name=args.name, cron=args.cron, parameters=kwargs, limit=1)
        return 0
    state = pipeline(**kwargs, exp_name=args.exp_name, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
