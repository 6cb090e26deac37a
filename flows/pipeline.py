"""Run the repository's DVC pipeline as a Prefect flow: one task per DVC stage.

DVC owns the pipeline and the cache; Prefect adds scheduling, retries, live logs and artifacts
(`flows.summary`). Every DVC command runs in its own process group, its output streamed to the
run logger, the whole group stopped on cancel or timeout (`flows.processes`).

Cancel
    Cancel in the UI (or `prefect flow-run cancel`) sets the run Cancelling. A runner or worker
    stops the runs it started from a deployment (SIGTERM to the flow process); nothing stops a run
    started by `python -m flows.pipeline run`. So the flow itself asks the API: between steps,
    and every `CANCEL_POLL_S` while a stage runs or the run waits for its training slot. Once
    Cancelling, the stage's process group gets SIGTERM (training writes its checkpoint) and
    SIGKILL after `kill_grace_s`, no further step runs, and the run ends Cancelled.

Stage order
    DVC plans the run exactly as `dvc repro [target]` would (`flows.dvc_commands.read_plan`).
    Each stage then runs as its own task, `dvc repro --single-item <stage>`, so DVC still decides
    whether the stage is up to date: a second run reruns nothing. Prefect caching is off for
    every task; DVC is the cache.

Parameters
    `params={"train.lr": 0.001}` means what `dvc exp run -S train.lr=0.001` means in the
    workspace, in three steps:
    1. before planning (a `matrix:` over a params list changes the stages), the overrides are
       written into the params files as `dvc exp run -S` writes them, after checking that the
       experiment name is free;
    2. the stages run one task each, as above, with `DVC_EXP_NAME` set as `dvc exp run` sets it;
    3. `dvc exp save -n <name> <stages>` records the result as one experiment, so
       `dvc exp show`, `dvc params diff` and `dvc metrics diff` list it like any other. The
       planned stages' outputs that git neither tracks nor ignores (dvc.lock's uncached metrics
       and plots, never committed in a fresh clone) are included, as `dvc exp run` includes them.
    The experiment is named after the Prefect flow run unless `exp_name` is given. One
    `dvc exp run -S` task would produce the same experiment but hide the stages inside a single
    task: no per-stage states, logs or retries. As with `dvc exp run`, the overrides stay in the
    workspace's params files after the run.

One training run per node
    A run that may train (its plan holds the train stage, and that stage or one planned before it
    is out of date, DVC's lock hides whether it is, or the run sets a param they read) first takes
    a slot of the Prefect global concurrency limit `unite-train-<host name>` (`train_limit`),
    created with one slot if missing, and holds it until its experiment is saved: a second
    training run on the node waits in the limit's queue instead of failing on DVC's lock.
    Evaluation-only runs take no slot (unless started while a stage of the workspace holds DVC's
    lock) and retry on the lock as before.

Slurm
    With `slurm` set (`--slurm [KEY=VALUE ...]`, or `{"slurm": {"nodes": 2}}` as a deployment's
    parameter) the stages run as one Slurm job, the one `python -m stages.slurm submit` submits:
    node 0 runs `dvc repro [target]` in this checkout, which the nodes must share. The flow logs
    the job's states and log, shows its id (artifact `unite-slurm-job`, tag `slurm-job-<id>`),
    fails when the job fails, and on Cancel scancels the job and waits until it has left the
    queue (training writes its checkpoint). It takes no training slot: Slurm schedules the nodes.
    Params, experiment and artifacts are as in a local run (`flows.slurm_job`).

Retries
    Only transient failures are retried (`retries`, `retry_delay_s`): DVC's repository lock was
    held, or a process was killed (`flows.dvc_commands.TransientDvcError`). Any other failure, and
    a task timeout, fails the flow at once.

CLI
    python -m flows.pipeline run [--target evaluate] [--set train.lr=0.001 ...] [--exp-name N]
                                 [--slurm [nodes=2 time=24:00:00 ...]]
    python -m flows.pipeline serve --cron "0 3 * * *" [--name unite-nightly] [--target ...]
"""

import argparse
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import TaskRun
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Cancelled, State
from prefect.tasks import Task
from pydantic import ValidationError

from flows.dvc_commands import (
    ParamValue,
    PlannedStage,
    StageResult,
    TransientDvcError,
    apply_params,
    metrics_show,
    read_plan,
    run_dvc,
    untracked,
)
from flows.processes import KILL_GRACE_S
from flows.slurm_job import JobLog, SlurmJob, show_job, tag_run
from flows.summary import TrainProgress, publish_metrics, publish_summary
from unite.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOW_NAME = "unite-pipeline"
TRAIN_STAGE = "train"  # its metrics file (dvc.yaml) holds the latest log row, kept current while it runs
TRAIN_LIMIT = "unite-train-{host}"  # the Prefect concurrency limit that queues training on one node
CANCEL_POLL_S = 2.0  # how often a running stage, or a run queued for its training slot, asks if it was cancelled


class SlurmJobFailed(RuntimeError):
    """The pipeline's Slurm job ended without completing; the message holds its log's last lines."""


class RunCancelled(Exception):
    """This flow run was set to Cancelling (Cancel in the UI, `prefect flow-run cancel`)."""


class CancelCheck:
    """Raises `RunCancelled` once this flow run is Cancelling; asks the API at most every `every_s`."""

    def __init__(self, every_s: float = 0.0) -> None:
        self.flow_run_id = UUID(flow_run.get_id())
        self.every_s = every_s
        self.next_s = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self.next_s:
            return
        self.next_s = now + self.every_s
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(self.flow_run_id).state
        except httpx.HTTPError:  # an API that is briefly unreachable must not stop a training run
            return
        if state is not None and state.is_cancelling():
            raise RunCancelled(f"flow run cancelled: {state.message or 'set Cancelling'}")


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
    plan = read_plan(Path(repo_dir), target, kill_grace_s, check_changed)
    get_run_logger().info("DVC plan: %s", " -> ".join(s.name for s in plan))
    return plan


@task(name="set-params", **_TASK_OPTIONS)
def set_params(repo_dir: str, params: dict[str, ParamValue], exp_name: str) -> list[str]:
    """Apply `-S` overrides to the params files as `dvc exp run -S` does; returns them."""
    overrides = apply_params(Path(repo_dir), params, exp_name)
    get_run_logger().info("params set as by `dvc exp run -S`: %s", " ".join(overrides))
    return overrides


def _progress_file(stage: PlannedStage) -> str | None:
    """The train stage's metrics file (its only one in dvc.yaml), which the trainer keeps current."""
    return stage.metrics[0] if stage.name == TRAIN_STAGE and stage.metrics else None


@task(name="stage", task_run_name="{stage}", **_TASK_OPTIONS)
def run_stage(stage: str, repo_dir: str, env: dict[str, str], kill_grace_s: float = KILL_GRACE_S,
              progress_file: str | None = None) -> StageResult | State[Any]:
    """`dvc repro --single-item <stage>`; DVC skips it when nothing it depends on changed. While it
    runs, the training rows in `progress_file` (if given) feed the progress artifact. When the flow
    run is cancelled the stage is stopped and the task returns, and ends in, a Cancelled state."""
    logger = get_run_logger()
    start = time.monotonic()
    progress = TrainProgress(Path(repo_dir), progress_file) if progress_file else None
    cancelled = CancelCheck(CANCEL_POLL_S)

    def tick() -> None:
        cancelled()  # raising stops the stage's process group: SIGTERM, SIGKILL after kill_grace_s
        if progress is not None:
            progress.update()

    try:
        cancelled()
        output = run_dvc(["repro", "--single-item", stage], f"stage {stage!r}", Path(repo_dir),
                         logger.info, env=env, kill_grace_s=kill_grace_s, tick=tick)
    except RunCancelled as exc:
        logger.warning("stage %r stopped after %.1f s: %s", stage, time.monotonic() - start, exc)
        return Cancelled(message=f"stage {stage!r} stopped: {exc}")
    if progress is not None:
        progress.update(force=True)
    result = StageResult(stage, output.outcome, round(time.monotonic() - start, 1))
    logger.info("stage %r: %s in %.1f s", stage, result.outcome, result.seconds)
    return result


@task(name="slurm-job", task_run_name="slurm job", **_TASK_OPTIONS)
def run_slurm_job(repo_dir: str, target: str | None, job: SlurmJob, env: dict[str, str],
                  plan: list[PlannedStage]) -> list[StageResult] | State[Any]:
    """`dvc repro [target]` as one Slurm job, the one `python -m stages.slurm submit` submits,
    followed until it has left the queue; returns what DVC did with each planned stage. A failed
    job fails the task. When the flow run is cancelled (or the task stopped) the job is cancelled
    and waited for, so training writes its checkpoint; the task then ends Cancelled."""
    # Imported here, not with the module: in a DVC repository whose own `stages.py` comes first on
    # sys.path (Prefect loads the flow from the repository), the flow still runs its stages locally.
    from stages.params import PARAMS_FILE, load_params
    from stages.slurm import cancel, exit_status, follow, job_settings, submit

    logger = get_run_logger()
    root = Path(repo_dir)
    try:
        settings = job_settings(load_params(root / PARAMS_FILE), job.model_dump())
    except ConfigError as error:
        raise ConfigError(f"{error}; fix it in {root / PARAMS_FILE} or in the flow's `slurm` parameter") from None
    job_id, log_path = submit(settings, ["repro", *([target] if target else [])], root, env)
    logger.info("submitted Slurm job %s; log: %s", job_id, log_path)
    tag_run(job_id)
    states: list[str] = []
    host = socket.gethostname()

    def on_state(state: str) -> None:
        states.append(state)
        logger.info("Slurm job %s: %s", job_id, state)
        show_job(job_id, log_path, states, host)

    log = JobLog(log_path, logger.info, time.monotonic)
    progress_file = next((f for f in map(_progress_file, plan) if f), None)
    progress = TrainProgress(root, progress_file) if progress_file else None
    cancelled = CancelCheck(CANCEL_POLL_S)

    def tick() -> None:
        log.read()
        if progress is not None:
            progress.update()
        cancelled()

    try:
        state, status = follow(job_id, on_state, tick)
    except RunCancelled as exc:
        logger.warning("cancelling Slurm job %s (%s); waiting until it has left the queue", job_id, exc)
        cancel(job_id, on_state)
        log.read()
        return Cancelled(message=f"Slurm job {job_id} cancelled: {exc}")
    except BaseException:  # a timeout, the runner's SIGTERM, Ctrl-C: the job must not outlive the run
        logger.warning("cancelling Slurm job %s; waiting until it has left the queue", job_id)
        cancel(job_id, on_state)
        raise
    log.read()
    if progress is not None:
        progress.update(force=True)
    if exit_status(state, status) != 0:
        tail = "\n".join(log.tail)
        raise SlurmJobFailed(f"Slurm job {job_id} ended {state} with exit status {status}; its log, "
                             f"{log_path}, ends:\n{tail}")
    return log.results(plan, time.monotonic())


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
    include = untracked(root, [out for stage in plan for out in stage.outs])
    run_dvc(["exp", "save", "-n", exp_name, *(arg for path in include for arg in ("-I", path)),
             *(stage.name for stage in plan)],
            f"saving experiment {exp_name!r}", root, get_run_logger().info, kill_grace_s=kill_grace_s)


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
    metrics, unreadable = metrics_show(root, kill_grace_s)
    publish_metrics(root, metrics)
    publish_summary(f"{FLOW_NAME}: `{flow_run.get_name()}`", root, plan, results, target, overrides, exp_name,
                    metrics, unreadable)
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
def training_slot(name: str, cancelled: CancelCheck) -> Iterator[None]:
    """Hold a slot of the Prefect global concurrency limit `name`, waiting in its queue; the limit
    is created with one slot when it does not exist yet (change it with `prefect gcl update`).

    While every slot is taken, the run asks every `CANCEL_POLL_S` whether one is free and whether
    it was cancelled; only then does it enter Prefect's acquisition, which a cancel does not
    interrupt (short, unless another run takes the freed slot first). Prefect's acquisition with a
    timeout would log an error at every try."""
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
        while True:
            limit = client.read_global_concurrency_limit_by_name(name)
            if not limit.active or limit.active_slots < limit.limit:
                break
            cancelled()
            time.sleep(CANCEL_POLL_S)
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
    slurm: SlurmJob | None = None,
) -> dict[str, dict[str, Any]] | State[Any]:
    """Run the DVC stages up to `target` (all by default), then publish metrics and grids.

    `params` are `dvc exp run -S` overrides ({"train.lr": 0.001}); with them the run is saved as
    DVC experiment `exp_name` (default: this flow run's name). A run that may train first waits
    for the node's training slot, the Prefect concurrency limit `train_limit` (default
    `unite-train-<host name>`), and holds it until its experiment is saved. With `slurm` set
    (`{}`: params.yaml's `slurm` section) the stages run as one Slurm job instead, and the run
    takes no training slot: Slurm schedules the nodes. Returns the metrics per file, or a
    Cancelled state once the run is cancelled.
    """
    root = str(Path(repo_dir).resolve() if repo_dir else REPO_ROOT)
    options: dict[str, Any] = dict(retries=retries, retry_delay_seconds=retry_delay_s)
    overrides: list[str] = []
    env: dict[str, str] = {}
    name = None
    cancelled = CancelCheck()
    try:
        # What is out of date only matters for the training slot, which a Slurm run does not take.
        plan = plan_stages.with_options(**options)(root, target, kill_grace_s, check_changed=slurm is None)
        slot = train_limit or TRAIN_LIMIT.format(host=socket.gethostname())
        trains_here = slurm is None and may_train(plan, params or {})
        with training_slot(slot, cancelled) if trains_here else nullcontext():
            if params:  # before planning again: a `matrix:` over a params list changes the stages
                cancelled()
                name = exp_name or str(flow_run.get_name())
                overrides = set_params.with_options(**options)(root, params, name)
                env["DVC_EXP_NAME"] = name
                plan = plan_stages.with_options(**options)(root, target, kill_grace_s)
            if slurm is not None:
                results = run_slurm_job.with_options(**options)(root, target, slurm, env, plan)
                if isinstance(results, State):  # the job was cancelled: the run was cancelled
                    return results
            else:
                results = []
                stage_task = run_stage.with_options(**options, timeout_seconds=stage_timeout_s)
                for stage in plan:
                    result = stage_task(stage.name, root, env, kill_grace_s, _progress_file(stage))
                    if isinstance(result, State):  # the stage was stopped: the run was cancelled
                        return result
                    results.append(result)
            if name is not None:
                cancelled()
                save_experiment.with_options(**options)(root, name, plan, kill_grace_s)
        cancelled()
        metrics = publish.with_options(**options)(root, plan, results, target, overrides, name, kill_grace_s)
        cancelled()  # the API accepts no end but Cancelled for a Cancelling run
    except RunCancelled as exc:
        get_run_logger().warning("%s; no further step runs", exc)
        return Cancelled(message=str(exc))
    return metrics


# ---------------------------------------------------------------- CLI


def _parse_pairs(items: Sequence[str], option: str) -> dict[str, ParamValue]:
    params: dict[str, ParamValue] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{option} expects KEY=VALUE, got {item!r}")
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
        p.add_argument("--slurm", nargs="*", metavar="KEY=VALUE",
                       help="run the stages as one Slurm job, its size from params.yaml's slurm section "
                            "or KEY=VALUE (nodes=2 time=24:00:00 ...)")
    run_p.add_argument("--exp-name", help="DVC experiment name when --set is given")
    serve_p.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: %(default)s)")
    serve_p.add_argument("--name", default="unite-nightly", help="deployment name")
    args = parser.parse_args(argv)

    kwargs: dict[str, Any] = dict(
        target=args.target, params=_parse_pairs(args.set, "--set") or None, repo_dir=args.repo,
        retries=args.retries, retry_delay_s=args.retry_delay, stage_timeout_s=args.stage_timeout,
    )
    if args.slurm is not None:
        try:
            kwargs["slurm"] = SlurmJob(**_parse_pairs(args.slurm, "--slurm"))
        except ValidationError as error:
            raise SystemExit(f"--slurm: {error}") from None
    if args.command == "serve":
        # limit=1: two DVC runs in one workspace would only fight over the repository lock.
        pipeline.serve(name=args.name, cron=args.cron, parameters=kwargs, limit=1)
        return 0
    state = pipeline(**kwargs, exp_name=args.exp_name, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
