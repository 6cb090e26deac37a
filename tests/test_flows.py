"""The Prefect flow against a Prefect test server and throw-away DVC repositories.

The module-scoped Prefect server of tests/conftest.py (`harness`), which requires an API auth
string; each test copies a git+DVC template repository and writes its own trivial stages
(`stages.py <name>`).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import TaskRun
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_API_URL,
    temporary_settings,
)
from prefect.states import Cancelling

from stages.preset import merge_params
from stages.rehearse import copy_files
from flows.dvc_commands import LOCK_MESSAGE, DvcError, PlannedStage
from flows.pipeline import may_train, pipeline
from flows.processes import terminal_line
from flows.summary import METRICS_KEY, PROGRESS_KEY, SUMMARY_KEY

ROOT = Path(__file__).resolve().parents[1]
PY = shlex.quote(sys.executable)

STAGES_PY = '''
import json, os, signal, sys, time
from pathlib import Path
import yaml

def params():
    return yaml.safe_load(Path("params.yaml").read_text())

def bump(name):
    """Count executions in an untracked file, so tests see how often DVC ran a stage."""
    counter = Path(f"{name}.count")
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return n

def prepare():
    n = params()["prepare"]["n"]
    Path("data").mkdir(exist_ok=True)
    Path("data/numbers.txt").write_text(" ".join(str(i) for i in range(1, n + 1)))
    print(f"prepare: n={n} experiment={os.environ.get('DVC_EXP_NAME')}")

def train():
    scale = params()["train"]["scale"]
    total = scale * sum(int(x) for x in Path("data/numbers.txt").read_text().split())
    Path("model.txt").write_text(str(total))
    print(f"train: total={total}")

def evaluate():
    total = int(Path("model.txt").read_text())
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/eval.json").write_text(json.dumps({"score": total, "detail": {"half": total / 2}}))
    Path("grids").mkdir(exist_ok=True)
    Path("grids/class_0.png").write_bytes(b"not really a png")
    print(f"evaluate: score={total}")

def broken():
    bump("broken")
    print("broken: bad input")
    sys.exit(3)

def flaky():
    if bump("flaky") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    Path("flaky.txt").write_text("ok")

def plain():
    bump("plain")
    Path("plain.txt").write_text("ok")

def gated_train():
    """Logs training rows as the trainer does (metrics/train.json), stopping at step 2 of 4 until
    the test creates `go`; records when it ran in train.log."""
    with open("train.log", "a") as log:
        log.write(f"start {time.time()}\\n")
    Path("metrics").mkdir(exist_ok=True)
    for step in (2, 4):
        while step == 4 and not Path("go").exists():
            time.sleep(0.1)
        row = {"step": step, "max_steps": 4, "loss": 1.0 / step, "images_per_s": 50.0 * step}
        Path("metrics/train.json").write_text(json.dumps(row))
    train()
    with open("train.log", "a") as log:
        log.write(f"end {time.time()}\\n")

globals()[sys.argv[1]]()
'''

DEMO_STAGES: dict[str, Any] = {
    "prepare": {"cmd": f"{PY} stages.py prepare", "params": ["prepare.n"], "outs": ["data"]},
    "train": {"cmd": f"{PY} stages.py train", "deps": ["data"], "params": ["train.scale"],
              "outs": ["model.txt"]},
    "evaluate": {"cmd": f"{PY} stages.py evaluate", "deps": ["model.txt"], "outs": ["grids"],
                 "metrics": [{"metrics/eval.json": {"cache": False}}]},
}


# The real pipeline shrunk to a few steps and samples (as tests/test_pipeline.py does).
TINY_PARAMS: dict[str, Any] = {
    "shard": {"shard_size": 100},
    "fid_ref": {"feature_space": "pixel"},
    "train": {"max_steps": 4, "checkpoint_every": 2, "log_every": 2, "global_batch": 16, "per_device_batch": 16,
              "schedule": {"warmup_steps": 2, "hold_until_step": 3, "decay_until_step": 4, "final_lr_factor": 0.5}},
    "sweep": {"num_images": 20, "max_extra_steps": 1, "solver": "euler", "steps": 3, "block_size": 10},
    "evaluate": {"num_images": 20, "solver": "euler", "steps": 3, "block_size": 10, "grid_per_class": 2,
                 "kid_subset_size": 10},
}


def _tool_env() -> dict[str, str]:
    """The environment of a user's shell: the project's tools on PATH, this test's Prefect server."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "PREFECT_API_URL": PREFECT_API_URL.value()}


def _run(repo: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=repo, env=_tool_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _fresh_clone_after_demo(path: Path) -> Path:
    """A newcomer's state: the project's files in one commit, then `dvc repro` (what `scripts/demo`
    runs), nothing committed since, so dvc.lock and the uncached metrics are untracked files."""
    copy_files(path)
    params_file = path / "params.yaml"
    params_file.write_text(yaml.safe_dump(merge_params(yaml.safe_load(params_file.read_text()), TINY_PARAMS)))
    _git(path, "init", "-q")
    _git(path, "add", "-A")
    _git(path, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "clone")
    _run(path, "dvc", "repro")
    assert_run_not_committed(path)
    return path


def assert_run_not_committed(repo: Path) -> None:
    """dvc.lock and the metrics exist and are untracked: git has never held them, in no commit."""
    status = _git(repo, "status", "--porcelain").splitlines()
    assert {"?? dvc.lock", "?? metrics/"} <= set(status), status
    assert _git(repo, "log", "--all", "--format=%h", "--", "dvc.lock", "metrics") == ""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


# A stage that records the SIGTERM it gets (as training does, writing its checkpoint) and leaves a
# child `sleep` in its process group.
RECORDS_SIGTERM = "trap 'echo TERM > term.txt; exit 143' TERM; sleep 300 & echo $! > child.pid; wait"


@pytest.fixture(scope="session")
def template_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("template") / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "test@example.com")
    _git(repo, "config", "user.name", "test")
    for args in (["init", "-q"], ["config", "core.analytics", "false"], ["config", "core.check_update", "false"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True)
    (repo / "stages.py").write_text(STAGES_PY)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "dvc init")
    return repo


@pytest.fixture
def make_repo(template_repo: Path, tmp_path: Path) -> Callable[..., Path]:
    """A fresh committed DVC repository with the given stages (dvc.yaml order kept)."""

    def make(stages: dict[str, Any], metrics: list[str] | None = None) -> Path:
        repo = tmp_path / "repo"
        shutil.copytree(template_repo, repo)
        (repo / "params.yaml").write_text(yaml.safe_dump({"prepare": {"n": 3}, "train": {"scale": 2}}))
        dvc_yaml: dict[str, Any] = {"stages": stages, **({"metrics": metrics} if metrics else {})}
        (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", "pipeline")
        return repo

    return make


def _task_runs(flow_run_id: UUID) -> list[TaskRun]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)


def _logs(flow_run_id: UUID) -> list[str]:
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: json.loads(a.data) if a.type == "table" else a.data for a in found}


def _stage_run(flow_run_id: UUID, stage: str) -> TaskRun:
    (run,) = [r for r in _task_runs(flow_run_id) if r.name == stage]
    return run


def _first_index(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_until(condition: Callable[[], bool], seconds: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def test_terminal_line_keeps_last_progress_state() -> None:
    assert terminal_line(b"step 1\r step 2\rstep 3\r\n") == "step 3"
    assert terminal_line("caf\u00e9\n".encode()) == "caf\u00e9"


def test_which_runs_may_train() -> None:
    """The dvc.yaml of this repository: train reads the `train` section, evaluate `evaluate`."""
    def plan(changed: bool | None) -> list[PlannedStage]:
        return [PlannedStage("shard", (), (("params.yaml", "shard"),), False),
                PlannedStage("train", (), (("params.yaml", "train"),), changed),
                PlannedStage("evaluate", (), (("params.yaml", "evaluate"),), True)]

    assert not may_train(plan(False), {})
    assert not may_train(plan(False), {"evaluate.num_images": 300})
    assert may_train(plan(False), {"train.base_lr": 0.001})
    assert may_train(plan(False), {"params.yaml:train.schedule.warmup_steps": 5})
    assert may_train(plan(True), {})
    assert may_train(plan(None), {"evaluate.num_images": 300})  # DVC's lock was held: cannot tell
    assert not may_train(plan(None)[2:], {"train.base_lr": 0.001})  # no train stage planned


def test_runs_stages_in_dvc_order_publishes_artifacts_and_reruns_nothing(
    harness: None, make_repo: Callable[..., Path]
) -> None:
    repo = make_repo(DEMO_STAGES, metrics=["metrics/eval.json"])
    state = pipeline(repo_dir=str(repo), retry_delay_s=0, return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {"metrics/eval.json": {"score": 12, "detail.half": 6.0}}

    flow_run_id = state.state_details.flow_run_id
    stage_runs = [r.name for r in _task_runs(flow_run_id) if r.name in DEMO_STAGES]
    assert stage_runs == ["prepare", "train", "evaluate"]
    logs = _logs(flow_run_id)
    assert _first_index(logs, "prepare: n=3") < _first_index(logs, "train: total=12") < _first_index(
        logs, "evaluate: score=12"
    )

    artifacts = _artifacts(flow_run_id)
    assert {"file": "metrics/eval.json", "metric": "score", "value": 12} in artifacts[METRICS_KEY]
    summary = artifacts[SUMMARY_KEY]
    assert "| evaluate | ran |" in summary and "| score | 12 |" in summary
    assert "`grids/class_0.png`" in summary

    outputs = [repo / "data" / "numbers.txt", repo / "model.txt", repo / "metrics" / "eval.json"]
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    again = pipeline(repo_dir=str(repo), retry_delay_s=0, return_state=True)
    assert again.is_completed(), again.message
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes
    again_id = again.state_details.flow_run_id
    assert "Stage 'train' didn't change, skipping" in "\n".join(_logs(again_id))
    assert "| prepare | up to date |" in _artifacts(again_id)[SUMMARY_KEY]


def test_params_pass_through_and_are_saved_as_a_dvc_experiment(
    harness: None, make_repo: Callable[..., Path]
) -> None:
    repo = make_repo(DEMO_STAGES, metrics=["metrics/eval.json"])
    state = pipeline(repo_dir=str(repo), target="train", params={"prepare.n": 5, "train.scale": "3"},
                     exp_name="n5", retry_delay_s=0, return_state=True)
    assert state.is_completed(), state.message
    assert (repo / "model.txt").read_text() == "45"
    assert "prepare: n=5 experiment=n5" in _logs(state.state_details.flow_run_id)
    assert not (repo / "metrics" / "eval.json").exists()  # evaluate is downstream of the target
    assert [r.name for r in _task_runs(state.state_details.flow_run_id) if r.name in DEMO_STAGES] == [
        "prepare", "train"
    ]

    refs = _git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    (ref,) = [r for r in refs if not r.startswith("refs/exps/exec/")]  # exec/: DVC's scratch refs
    assert ref.endswith("/n5")
    assert yaml.safe_load(_git(repo, "show", f"{ref}:params.yaml")) == {"prepare": {"n": 5}, "train": {"scale": 3}}
    assert set(yaml.safe_load(_git(repo, "show", f"{ref}:dvc.lock"))["stages"]) == {"prepare", "train"}

    # Bad params stop the run before any stage, and the message names the key.
    for params, exp_name, match in (
        ({"prepare.n": 6}, "n5", "exp_name 'n5'"),
        ({"prepare.m": 6}, "typo", "prepare.m"),
    ):
        failed = pipeline(repo_dir=str(repo), params=params, exp_name=exp_name, retry_delay_s=0, return_state=True)
        assert failed.is_failed()
        with pytest.raises(ValueError, match=match):
            failed.result()
        assert not [r for r in _task_runs(failed.state_details.flow_run_id) if r.name in DEMO_STAGES]
    assert yaml.safe_load((repo / "params.yaml").read_text())["prepare"]["n"] == 5


def test_only_transient_failures_are_retried(harness: None, make_repo: Callable[..., Path]) -> None:
    """`flaky` is SIGKILLed on its first run (retried); `broken` exits 3 (fails at once)."""
    repo = make_repo({
        "flaky": {"cmd": f"{PY} stages.py flaky", "outs": ["flaky.txt"]},
        "broken": {"cmd": f"{PY} stages.py broken", "deps": ["flaky.txt"], "outs": ["never.txt"]},
    })
    state = pipeline(repo_dir=str(repo), retries=2, retry_delay_s=0, return_state=True)
    assert state.is_failed()
    with pytest.raises(DvcError, match="stage 'broken' failed .*not retried"):
        state.result()
    flow_run_id = state.state_details.flow_run_id
    assert (repo / "flaky.count").read_text() == "2"
    assert _stage_run(flow_run_id, "flaky").run_count == 2
    assert (repo / "broken.count").read_text() == "1"
    assert _stage_run(flow_run_id, "broken").run_count == 1
    logs = _logs(flow_run_id)
    assert any("stage 'flaky': transient failure, the stage command was killed" in line for line in logs)
    assert "broken: bad input" in logs


def test_held_dvc_lock_is_retried(harness: None, make_repo: Callable[..., Path]) -> None:
    """Another DVC process holds the repository lock for the first attempt only."""
    from dvc.lock import make_lock

    repo = make_repo({"plain": {"cmd": f"{PY} stages.py plain", "outs": ["plain.txt"]}})
    lock = make_lock(str(repo / ".dvc" / "tmp" / "lock"))
    lock.lock()

    class ReleaseOnLockError(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if LOCK_MESSAGE in record.getMessage() and lock.is_locked:
                lock.unlock()

    handler = ReleaseOnLockError()
    task_logger = logging.getLogger("prefect.task_runs")
    task_logger.addHandler(handler)
    try:
        state = pipeline(repo_dir=str(repo), retries=2, retry_delay_s=0, return_state=True)
    finally:
        task_logger.removeHandler(handler)
        if lock.is_locked:
            lock.unlock()
    assert state.is_completed(), state.message
    assert (repo / "plain.count").read_text() == "1"
    assert _stage_run(state.state_details.flow_run_id, "plain").run_count == 2


def test_timeout_kills_the_stage_process_group(harness: None, make_repo: Callable[..., Path]) -> None:
    """The child ignores SIGTERM, so it only dies by the SIGKILL after the grace period."""
    cmd = "trap '' TERM; sleep 300 & echo $! > child.pid; wait"
    repo = make_repo({"hang": {"cmd": cmd, "outs": ["never.txt"]}})
    state = pipeline(repo_dir=str(repo), stage_timeout_s=7, kill_grace_s=1, retries=2, retry_delay_s=0,
                     return_state=True)
    assert state.is_failed()
    stage = _stage_run(state.state_details.flow_run_id, "hang")
    assert stage.state is not None and stage.state.name == "TimedOut", stage.state
    child = int((repo / "child.pid").read_text())
    assert _wait_until(lambda: not _alive(child), 5), f"sleep {child} survived the timeout"
    assert stage.run_count == 1


def test_served_deployment_runs_on_cron_and_cancel_kills_the_stage_group(
    harness: None, make_repo: Callable[..., Path]
) -> None:
    """`serve` registers the cron deployment; cancelling its run (as the UI does) makes the
    runner SIGTERM the flow-run process, which must take the stage's process group with it,
    SIGTERM first."""
    repo = make_repo({"hang": {"cmd": RECORDS_SIGTERM, "outs": ["never.txt"]}})
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", "serve", "--cron", "5 4 * * *", "--name", "nightly",
         "--repo", str(repo)],
        cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with get_client(sync_client=True) as client:
            deployment = None

            def registered() -> bool:
                nonlocal deployment
                found = client.read_deployments()
                deployment = next((d for d in found if d.name == "nightly"), None)
                return deployment is not None

            assert _wait_until(registered, 60, every=0.5), "serve registered no deployment"
            assert deployment is not None
            assert [s.schedule.cron for s in deployment.schedules] == ["5 4 * * *"]
            assert deployment.parameters["repo_dir"] == str(repo)

            flow_run = run_deployment(deployment.id, timeout=0)
            pid_file = repo / "child.pid"
            assert _wait_until(lambda: pid_file.is_file() and pid_file.read_text().strip() != "", 60)
            child = int(pid_file.read_text())
            assert _alive(child)
            client.set_flow_run_state(flow_run.id, Cancelling())
            assert _wait_until(lambda: client.read_flow_run(flow_run.id).state.is_cancelled(), 60, every=0.5)
        assert _wait_until(lambda: not _alive(child), 5), f"sleep {child} survived the cancelled run"
        assert (repo / "term.txt").read_text().strip() == "TERM"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_cancel_stops_a_run_started_from_the_command_line(harness: None, make_repo: Callable[..., Path]) -> None:
    """No runner stops a `python -m flows.pipeline run`: cancelling it (as the UI does) must still
    SIGTERM the stage's process group, stop its children, run no later stage, and end the run and
    the stage Cancelled."""
    repo = make_repo({
        "hang": {"cmd": RECORDS_SIGTERM, "outs": ["never.txt"]},
        "after": {"cmd": f"{PY} stages.py plain", "deps": ["never.txt"], "outs": ["plain.txt"]},
    })
    out = repo.parent / "run.out"
    with open(out, "wb") as log:
        run = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "run", "--repo", str(repo), "--retries", "0"],
                               cwd=ROOT, env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        pid_file = repo / "child.pid"
        assert _wait_until(lambda: pid_file.is_file() and pid_file.read_text().strip() != "", 120), out.read_text()
        child = int(pid_file.read_text())
        with get_client(sync_client=True) as client:
            (flow_run,) = [r for r in client.read_flow_runs() if r.parameters.get("repo_dir") == str(repo)]
            client.set_flow_run_state(flow_run.id, Cancelling())
            cancelled_at = time.monotonic()
            assert run.wait(timeout=60) == 1, out.read_text()
            print(f"cancel -> flow process exit: {time.monotonic() - cancelled_at:.1f} s")
            state = client.read_flow_run(flow_run.id).state
        assert state is not None and state.is_cancelled(), (state, out.read_text())
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert not _alive(child), f"sleep {child} survived the cancelled run"
    assert (repo / "term.txt").read_text().strip() == "TERM"
    stage = _stage_run(flow_run.id, "hang")
    assert stage.state is not None and stage.state.is_cancelled(), stage.state
    assert not (repo / "plain.count").exists()
    assert not [r for r in _task_runs(flow_run.id) if r.name in ("after", "publish")]


def test_cancel_stops_a_run_queued_for_the_training_slot(harness: None, make_repo: Callable[..., Path]) -> None:
    """A run that waits for the node's training slot (held here, as by another training run) and
    is cancelled meanwhile stops waiting, runs no stage and ends Cancelled."""
    repo = make_repo({"train": {"cmd": f"{PY} stages.py plain", "outs": ["plain.txt"]}})
    limit = "test-queued-cancel"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))

    class CancelWhenQueued(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for a slot of concurrency limit" in record.getMessage():
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(UUID(getattr(record, "flow_run_id")), Cancelling())

    held, done = threading.Event(), threading.Event()

    def hold_slot() -> None:  # for a minute at most: a run that ignores the cancel trains after it
        with concurrency(limit, occupy=1, strict=True):
            held.set()
            done.wait(60)

    holder = threading.Thread(target=hold_slot, daemon=True)
    holder.start()
    assert held.wait(60)
    handler = CancelWhenQueued()
    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(handler)
    try:
        state = pipeline(repo_dir=str(repo), train_limit=limit, retries=0, return_state=True)
    finally:
        flow_logger.removeHandler(handler)
        done.set()
        holder.join()
    assert state.is_cancelled(), state
    assert not (repo / "plain.count").exists()
    assert not [r for r in _task_runs(state.state_details.flow_run_id) if r.name == "train"]


def test_server_refuses_a_client_without_the_auth_string(harness: None) -> None:
    """Every other test here reaches the server with the auth string; without it, or with another
    one, the API answers 401 (the health check stays open for probes)."""
    with get_client(sync_client=True) as client:
        client.read_flows()
        for auth in (None, "guessed"):
            with temporary_settings(updates={PREFECT_API_AUTH_STRING: auth}), get_client(sync_client=True) as stranger:
                with pytest.raises(PrefectHTTPStatusError) as refused:
                    stranger.read_flows()
                assert refused.value.response.status_code == 401
                assert stranger.api_healthcheck() is None


@pytest.mark.slow
def test_flow_experiments_keep_their_metrics_from_a_fresh_clone(harness: None, tmp_path: Path) -> None:
    """Two flow runs with different `--set` values after the demo, nothing committed: both
    experiments hold their params and metrics, and DVC can diff them."""
    repo = _fresh_clone_after_demo(tmp_path / "clone")
    for seed in (1, 2):
        _run(repo, sys.executable, "-m", "flows.pipeline", "run", "--repo", str(repo), "--retry-delay", "0",
             "--set", f"evaluate.seed={seed}", "--exp-name", f"seed-{seed}")

    shown = json.loads(_run(repo, "dvc", "exp", "show", "--json").stdout)
    experiments = {exp["name"]: exp["revs"][0]["data"] for base in shown for exp in base.get("experiments") or []}
    assert set(experiments) == {"seed-1", "seed-2"}
    for seed in (1, 2):
        data = experiments[f"seed-{seed}"]
        assert data["params"]["params.yaml"]["data"]["evaluate"]["seed"] == seed
        for name in ("metrics/eval.json", "metrics/sweep.json", "metrics/train.json", "metrics/shard.json"):
            assert "data" in data["metrics"][name], (name, data["metrics"][name])
        assert data["metrics"]["metrics/eval.json"]["data"]["generation"]["num_images"] == 20

    params_diff = json.loads(_run(repo, "dvc", "params", "diff", "seed-1", "seed-2", "--json").stdout)
    assert params_diff["params.yaml"]["evaluate.seed"] == {"old": 1, "new": 2, "diff": 1}
    metrics_diff = json.loads(_run(repo, "dvc", "metrics", "diff", "seed-1", "seed-2", "--json").stdout)
    changed = metrics_diff.get("metrics/eval.json", {})
    assert changed and all(entry["old"] is not None and entry["new"] is not None for entry in changed.values())


def test_training_runs_on_one_node_queue_and_show_progress(harness: None, make_repo: Callable[..., Path]) -> None:
    """Two flow runs that train in one workspace, from the CLI, without retries: the second waits
    for the node's training slot instead of failing on DVC's lock, then trains and completes. While
    the first trains, its progress artifact shows the logged step."""
    repo = make_repo({
        "prepare": DEMO_STAGES["prepare"],
        "train": {"cmd": f"{PY} stages.py gated_train", "deps": ["data"], "params": ["train.scale"],
                  "outs": ["model.txt"], "metrics": [{"metrics/train.json": {"cache": False}}]},
    })
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}

    def start(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        out = repo.parent / f"{name}.out"
        with open(out, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.pipeline", "run", "--repo", str(repo), "--retries", "0", *args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return process, out

    def progress() -> list[tuple[float, str]]:
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PROGRESS_KEY])))
        return [(float(a.data), a.description or "") for a in found]

    train_log = repo / "train.log"
    first, first_out = start("first")
    second = None
    try:
        assert _wait_until(lambda: train_log.is_file(), 120, every=0.2), first_out.read_text()
        assert _wait_until(lambda: (50.0, "training: step 2 / 4, loss 0.5, 100.0 images/s") in progress(), 60,
                           every=0.5), progress()
        second, second_out = start("second", "--set", "train.scale=3", "--exp-name", "scale3")
        # The line is logged before the slot is asked for, waiting or not: it only says when.
        assert _wait_until(lambda: "waiting for a slot of concurrency limit" in second_out.read_text(), 120,
                           every=0.2), second_out.read_text()
        asked = time.time()
        time.sleep(3)  # time enough for a second run that did not queue to start training or fail on DVC's lock
        assert second.poll() is None, second_out.read_text()
        (repo / "go").touch()
        assert first.wait(timeout=300) == 0, first_out.read_text()
        assert second.wait(timeout=300) == 0, second_out.read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    events = [line.split() for line in train_log.read_text().splitlines()]
    assert [kind for kind, _ in events] == ["start", "end", "start", "end"]
    # The second run asked for the slot while the first trained, and trained only after it ended.
    first_end, second_start = float(events[1][1]), float(events[2][1])
    assert float(events[0][1]) < asked < first_end <= second_start
    assert (repo / "model.txt").read_text() == "18"  # scale 3 x (1 + 2 + 3)
    assert (100.0, "training: step 4 / 4, loss 0.25, 200.0 images/s") in progress()


def test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_the_pipeline(
    harness: None, make_repo: Callable[..., Path]
) -> None:
    """The commands of prefect.yaml's header, in a checkout that holds the flow: create the pool,
    deploy, run the deployment, and a worker started on the node runs it in that checkout."""
    repo = make_repo({"plain": {"cmd": f"{PY} stages.py plain", "outs": ["plain.txt"]}})
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "prefect.yaml", repo / "prefect.yaml")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "UNITE_REPO": str(repo)}
    prefect = str(Path(sys.executable).parent / "prefect")
    for args in (["work-pool", "create", "gpu-nodes", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        done = subprocess.run([prefect, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("unite-pipeline/unite-cluster")
    assert deployment.work_pool_name == "gpu-nodes"
    flow_run = run_deployment(deployment.id, timeout=0)
    worker = subprocess.run([prefect, "worker", "start", "--pool", "gpu-nodes", "--run-once"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state is not None and state.is_completed(), worker.stdout + worker.stderr
    assert (repo / "plain.count").read_text() == "1"
