"""The pipeline as a Slurm job on a real one-host Slurm cluster (scripts/slurm-local, which installs
Debian's Slurm when it is missing), in a temporary copy of the repository with the shrunk demo
params: a job whose two tasks stand in for two nodes, failing ranks, a job cancelled by `scancel`
or by Ctrl-C of `submit --wait`, the time-limit warning that checkpoints, requeues and resumes, and
stops requeueing at slurm.max_requeues, Slurm's own warning before a one-minute limit, and the
Prefect flow that submits its run as a job (against conftest's Prefect server) and cancels it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import ArtifactSort
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelling

from flows.pipeline import TRAIN_LIMIT
from flows.slurm_job import JOB_KEY, JOB_TAG
from flows.summary import METRICS_KEY, SUMMARY_KEY
from stages.preset import merge_params
from stages.rehearse import copy_files
from stages.train import STORE_ENV
from test_flows import _artifacts, _logs, _wait_until
from test_pipeline import TINY

ROOT = Path(__file__).resolve().parents[1]
RWLOCK = Path(".dvc/tmp/rwlock")  # DVC's record of which running command reads and writes which path
pytestmark = pytest.mark.slow

# Two torchrun launchers of one process each on the one node: a world of two ranks, as two nodes
# would give. 36 steps, a checkpoint every two: a signal after the first lands mid-run, with 34
# steps (about 5 s) to spare on a busy machine.
MAX_STEPS = 36
LONG_STEPS = 1000  # for the tests that stop training and need not its end
SLURM_TINY = merge_params(TINY, {
    "train": {"max_steps": MAX_STEPS, "checkpoint_every": 2,
              "schedule": {"warmup_steps": 2, "hold_until_step": 18, "decay_until_step": MAX_STEPS,
                           "final_lr_factor": 0.5}},
    "slurm": {"tasks_per_node": 2, "signal_seconds": 60, "max_requeues": 2},
})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, str]:
    """A one-host Slurm cluster for this module; every job is cancelled and the daemons stopped after."""
    folder = tmp_path_factory.mktemp("slurm")
    script = ROOT / "scripts" / "slurm-local"
    subprocess.run([script, "start", folder], check=True)
    try:
        yield {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run([script, "stop", folder], check=True)


class Repo:
    def __init__(self, path: Path, env: dict[str, str]):
        self.path = path
        self.env = {**env, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=900)

    def submit(self, *options: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "stages.slurm", "submit", "--wait", *options], cwd=self.path,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def set_params(self, changes: dict) -> None:
        params_file = self.path / "params.yaml"
        params_file.write_text(yaml.safe_dump(merge_params(yaml.safe_load(params_file.read_text()), changes)))

    def checkpoints(self) -> list[Path]:
        return sorted(Path(self.env[STORE_ENV]).glob("*/checkpoints/step_*.pt"))

    def forget_training(self) -> None:
        """Remove the recipe's runs from the checkpoint store and the final model, so that the
        train stage trains from scratch (the job then runs `dvc repro --force` on the train stage:
        DVC would otherwise restore the model from its cache without training)."""
        subprocess.run(["rm", "-rf", *Path(self.env[STORE_ENV]).glob("*"), self.path / "models" / "final.pt"],
                       check=True)

    def queue(self) -> str:
        return subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, check=True).stdout


def job_of(submitted: subprocess.Popen) -> tuple[str, Path]:
    """The job id and log that `submit` prints first."""
    line = submitted.stdout.readline()
    found = re.match(r"unite: submitted job (\d+); log: (\S+)", line)
    assert found, line
    return found[1], Path(found[2])


def finish(submitted: subprocess.Popen) -> tuple[int, str]:
    out, _ = submitted.communicate(timeout=900)
    return submitted.returncode, out


def wait_for_checkpoint(repo: Repo, submitted: subprocess.Popen, log: Path) -> None:
    """Until training wrote its first checkpoint (it is then mid-run)."""
    while not repo.checkpoints():
        assert submitted.poll() is None, submitted.stdout.read() + log.read_text()
        time.sleep(0.05)


@contextlib.contextmanager
def training_until_stopped(repo: Repo) -> Iterator[None]:
    """Training that outlasts the test's signal however fast or busy the machine (the tests that
    stop it do not need its end), with the module's step count back after."""
    good = yaml.safe_load((repo.path / "params.yaml").read_text())["train"]["max_steps"]
    repo.set_params({"train": {"max_steps": LONG_STEPS}})
    try:
        yield
    finally:
        repo.set_params({"train": {"max_steps": good}})


def dvc_locks_left(repo: Repo) -> dict[str, int]:
    """How many paths DVC's record says its running commands read and write; none once a cancelled
    job's DVC ended after its stage. Killed, it leaves its entries (or an empty file when it was
    rewriting them, and every later DVC command in the checkout then fails)."""
    return {mode: len(paths) for mode, paths in json.loads((repo.path / RWLOCK).read_text()).items()}


def processes_of(job_id: str) -> list[str]:
    """Processes that Slurm started for the job (its environment names it), as 'pid: command line'."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"SLURM_JOB_ID={job_id}\0".encode() in environ.read_bytes():
                command = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{environ.parent.name}: {command.strip()}")
        except OSError:
            continue
    return found


def start_flow(repo: Repo, name: str, *args: str) -> tuple[subprocess.Popen, Path, object]:
    """`python -m flows.pipeline run --slurm` in the repository, as a user starts it; returns the
    process, its output file and its flow run once it exists, found by `name`, given as its
    experiment name (which a run without --set only records)."""
    out = repo.path.parent / f"{name}.out"
    env = {**repo.env, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_API_AUTH_STRING": os.environ["PREFECT_API_AUTH_STRING"]}
    with open(out, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.pipeline", "run", "--repo", str(repo.path), "--retries", "0", "--slurm",
             "--exp-name", name, *args], cwd=repo.path, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)
    found = []

    def created() -> bool:
        with get_client(sync_client=True) as client:
            found[:] = [r for r in client.read_flow_runs() if r.parameters.get("exp_name") == name]
        assert process.poll() is None or found, out.read_text()
        return bool(found)

    assert _wait_until(created, 120, every=0.5), out.read_text()
    return process, out, found[0]


def job_of_flow(flow_run_id) -> str:
    """The job id the flow run is tagged with."""
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(flow_run_id).tags
    prefix = JOB_TAG.format(job_id="")
    (job_id,) = [tag.removeprefix(prefix) for tag in tags if tag.startswith(prefix)]
    return job_id


def job_artifact(flow_run_id) -> str:
    """The latest version of the flow run's job artifact."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[JOB_KEY])),
                                      flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                      sort=ArtifactSort.CREATED_DESC)
    return found[0].data


def job_log_of_flow(flow_run_id, job_id: str) -> str:
    """The job's log, whose path the flow run logs when it submits the job."""
    submitted = next(line for line in _logs(flow_run_id) if line.startswith(f"submitted Slurm job {job_id}; log: "))
    return Path(submitted.split("; log: ")[1]).read_text()


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {f"{part}.{name}": tensor for part in ("model", "ema") for name, tensor in state[part].items()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, cluster) -> Repo:
    path = tmp_path_factory.mktemp("slurm-pipeline") / "repo"
    copy_files(path)
    repo = Repo(path, cluster)
    repo.set_params(SLURM_TINY)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", *identity, "commit", "-qm", "pipeline"]):
        subprocess.run(command, cwd=path, check=True, capture_output=True)
    return repo


def test_the_pipeline_runs_as_one_job_with_a_torchrun_per_task(repo):
    submitted = repo.submit()
    job_id, log = job_of(submitted)
    returncode, out = finish(submitted)
    text = log.read_text()
    assert returncode == 0, out + text
    for stage in ["demo_data", "manifest", "shard", "fid_ref", "train", "export", "sweep", "evaluate", "report"]:
        assert f"Running stage '{stage}'" in text, stage
    final = torch.load(repo.path / "models" / "final.pt", map_location="cpu", weights_only=False)
    assert len(final["rng"]) == 2 and final["step"] == MAX_STEPS  # a rank per task, each saving its random state
    assert repo.run("dvc", "status", "--quiet").returncode == 0  # dvc.lock records every stage
    assert repo.queue() == "" and processes_of(job_id) == []
    repo.uninterrupted = weights(repo.path / "models" / "final.pt")


def test_failing_ranks_fail_the_job_and_leave_dvc_lock_alone(repo):
    """Only the ranks know the world size (two tasks of one process): 15 images do not split in two."""
    lock = (repo.path / "dvc.lock").read_bytes()
    good = yaml.safe_load((repo.path / "params.yaml").read_text())["train"]["global_batch"]
    repo.set_params({"train": {"global_batch": 15}})
    try:
        submitted = repo.submit()
        job_id, log = job_of(submitted)
        returncode, out = finish(submitted)
    finally:
        repo.set_params({"train": {"global_batch": good}})
    text = log.read_text()
    assert returncode != 0, out + text
    assert "error: train: world_size=2: global_batch=15 cannot be split over 2 processes" in text
    assert "unite: error: `dvc repro` failed" in text
    assert (repo.path / "dvc.lock").read_bytes() == lock
    assert repo.queue() == "" and processes_of(job_id) == []


@pytest.mark.parametrize("stop", ["ctrl-c of submit", "scancel"])
def test_a_cancelled_job_ends_every_process_after_training_checkpoints(repo, stop):
    """Ctrl-C of `submit --wait` scancels the job; a user's own `scancel` of it ends `submit` too."""
    lock = (repo.path / "dvc.lock").read_bytes()
    repo.forget_training()
    with training_until_stopped(repo):
        submitted = repo.submit("--", "repro", "--force", "--single-item", "train")
        job_id, log = job_of(submitted)
        wait_for_checkpoint(repo, submitted, log)
        if stop == "scancel":
            subprocess.run(["scancel", job_id], env=repo.env, check=True)
        else:
            submitted.send_signal(signal.SIGINT)
        returncode, out = finish(submitted)
    assert returncode == (130 if stop == "ctrl-c of submit" else 1), out
    assert f"unite: job {job_id}: CANCELLED" in out
    assert repo.queue() == "" and processes_of(job_id) == []
    text = log.read_text()
    stopped = re.search(r"SIGTERM received; finished step (\d+), wrote (\S+)\.", text)
    assert stopped and int(stopped[1]) < LONG_STEPS and (repo.path / stopped[2]).is_file(), text
    assert "unite: cancelled; `dvc repro --force --single-item train` ended with exit status" in text, text
    assert (repo.path / "dvc.lock").read_bytes() == lock
    assert dvc_locks_left(repo) == {}


def test_the_time_limit_warning_checkpoints_requeues_and_resumes(repo):
    """Slurm's warning before the time limit is SIGUSR1 to the batch script (#SBATCH --signal=B:USR1@...);
    it is sent here as soon as training is mid-run, as Slurm would send it at a short limit."""
    repo.forget_training()
    submitted = repo.submit("--", "repro", "--force", "--downstream", "train")  # train and what follows it
    job_id, log = job_of(submitted)
    wait_for_checkpoint(repo, submitted, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=repo.env, check=True)
    returncode, out = finish(submitted)
    text = log.read_text()
    assert returncode == 0, out + text
    stopped = re.search(r"SIGTERM received; finished step (\d+), wrote", text)
    assert stopped and int(stopped[1]) < MAX_STEPS, text
    assert "unite: requeue 1 of at most 2 (slurm.max_requeues)" in text
    assert f"unite: job {job_id}, run 2," in text
    resumed = weights(repo.path / "models" / "final.pt")
    assert resumed.keys() == repo.uninterrupted.keys()
    for name, tensor in repo.uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert repo.run("dvc", "status", "--quiet").returncode == 0
    assert repo.queue() == "" and processes_of(job_id) == []


def test_a_flow_run_with_slurm_runs_as_a_job_and_publishes_its_results(repo, harness):
    """A change to a stage that does not train (fid_ref's batch size) and the flow's `--slurm`: the
    job, not the flow's process, runs DVC; the run shows the job and completes with the summary of
    a local run; dvc.lock records the stage; the job has left the queue."""
    repo.set_params({"fid_ref": {"batch_size": 50}})
    flow, out, flow_run = start_flow(repo, "slurm-fid-ref", "--target", "fid_ref")
    assert flow.wait(timeout=900) == 0, out.read_text()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.is_completed()
    job_id = job_of_flow(flow_run.id)
    logs = _logs(flow_run.id)
    job_log = job_log_of_flow(flow_run.id, job_id)
    assert f"unite: job {job_id}, run 1," in job_log and "Running stage 'fid_ref'" in job_log
    states = [line.split(": ")[1] for line in logs if line.startswith(f"Slurm job {job_id}: ")]
    assert "RUNNING" in states and states[-1] == "COMPLETED", states
    assert "Running stage 'fid_ref':" in logs  # the job's log, streamed to the run's
    artifacts = _artifacts(flow_run.id)
    assert job_artifact(flow_run.id).startswith(f"# Slurm job {job_id}: COMPLETED")
    assert "| fid_ref | ran |" in artifacts[SUMMARY_KEY]
    assert "metrics/shard.json" in {row["file"] for row in artifacts[METRICS_KEY]}  # fid_ref's upstream
    lock = yaml.safe_load((repo.path / "dvc.lock").read_text())
    assert lock["stages"]["fid_ref"]["params"]["params.yaml"]["fid_ref"]["batch_size"] == 50
    assert repo.queue() == "" and processes_of(job_id) == []


def test_cancel_of_a_slurm_flow_run_cancels_the_job_after_training_checkpoints(repo, harness):
    """A flow run that trains in Slurm takes no training slot of the submitting node; Cancel (as
    the UI sets it) scancels the job and the run ends Cancelled once the job has left the queue,
    every process ended, training's checkpoint written, dvc.lock untouched."""
    lock = (repo.path / "dvc.lock").read_bytes()
    repo.forget_training()
    with training_until_stopped(repo):
        flow, out, flow_run = start_flow(repo, "slurm-cancelled", "--target", "train")
        try:
            while not repo.checkpoints():
                assert flow.poll() is None, out.read_text()
                time.sleep(0.05)
            job_id = job_of_flow(flow_run.id)
            with get_client(sync_client=True) as client:
                try:
                    slot = client.read_global_concurrency_limit_by_name(TRAIN_LIMIT.format(host=socket.gethostname()))
                    assert slot.active_slots == 0, slot
                except ObjectNotFound:
                    pass
                client.set_flow_run_state(flow_run.id, Cancelling())
            assert flow.wait(timeout=300) == 1, out.read_text()
        finally:
            if flow.poll() is None:
                os.killpg(flow.pid, signal.SIGKILL)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_cancelled(), (state, out.read_text())
    assert repo.queue() == "" and processes_of(job_id) == []
    assert any(line.startswith(f"cancelling Slurm job {job_id}") for line in _logs(flow_run.id))
    job_log = job_log_of_flow(flow_run.id, job_id)
    stopped = re.search(r"SIGTERM received; finished step (\d+), wrote (\S+)\.", job_log)
    assert stopped and int(stopped[1]) < LONG_STEPS and (repo.path / stopped[2]).is_file(), job_log
    assert (repo.path / "dvc.lock").read_bytes() == lock
    assert dvc_locks_left(repo) == {}


def test_the_time_limit_warning_past_max_requeues_ends_the_job_and_keeps_the_checkpoint(repo):
    """With `--max-requeues 0` the first warning is past the bound: no requeue, the job fails with
    a message that says so and how to go on, training's checkpoint stays, dvc.lock untouched."""
    lock = (repo.path / "dvc.lock").read_bytes()
    repo.forget_training()
    with training_until_stopped(repo):
        submitted = repo.submit("--max-requeues", "0", "--", "repro", "--force", "--single-item", "train")
        job_id, log = job_of(submitted)
        wait_for_checkpoint(repo, submitted, log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=repo.env, check=True)
        returncode, out = finish(submitted)
    text = log.read_text()
    assert returncode != 0, out + text
    stopped = re.search(r"SIGTERM received; finished step (\d+), wrote (\S+)\.", text)
    assert stopped and int(stopped[1]) < LONG_STEPS and (repo.path / stopped[2]).is_file(), text
    assert ("unite: error: the time limit was reached after 0 requeues (slurm.max_requeues), the bound: no "
            "further requeue. Training's checkpoint is kept: submit again to resume from it") in text
    assert "unite: requeue" not in text and f"unite: job {job_id}, run 2," not in text
    assert (repo.path / "dvc.lock").read_bytes() == lock
    assert repo.queue() == "" and processes_of(job_id) == []


def test_slurms_own_time_limit_warning_reaches_the_batch_script_before_the_limit(repo):
    """The other time-limit tests send the warning themselves; here Slurm sends it, from the job's
    `#SBATCH --signal` line: a one-minute job warned 60 s before its limit, whose stage (a pipeline
    of its own in a subfolder, which sleeps) would outlive it. Slurm checks its time limits about
    every 30 s, so the warning comes within a minute; the job then ends by the script's bound of 0
    requeues, before the limit, not killed at it (state TIMEOUT). The stage's shell forks its
    commands (a list, as dash does even for one command): the sleep gets SIGTERM too, and no
    process outlives the job."""
    pipeline = repo.path / "sleeper"
    pipeline.mkdir()
    (pipeline / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sleep": {"cmd": "sleep 600 && echo slept"}}}))
    try:
        submitted = repo.submit("--time", "0:01:00", "--signal-seconds", "60", "--max-requeues", "0", "--",
                                "repro", "sleeper/dvc.yaml")
        job_id, log = job_of(submitted)
        returncode, out = finish(submitted)
    finally:
        subprocess.run(["rm", "-rf", pipeline], check=True)
    text = log.read_text()
    assert returncode != 0, out + text
    assert "unite: the time limit is near: the job's steps get SIGTERM" in text, out + text
    assert "unite: error: the time limit was reached after 0 requeues (slurm.max_requeues)" in text
    assert f"unite: job {job_id}: FAILED" in out and "TIMEOUT" not in out
    assert repo.queue() == "" and processes_of(job_id) == []


def test_submit_refuses_gpus_that_do_not_match_the_stages_processes(tmp_path):
    """Checked before anything is submitted: the repository's params run one process per node."""
    result = subprocess.run([sys.executable, "-m", "stages.slurm", "submit", "--nodes", "2", "--gpus-per-node", "8"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: slurm: train.nproc_per_node=1: must equal slurm.gpus_per_node / slurm.tasks_per_node = 8 (one "
        "process per GPU); fix it in params.yaml or on the command line")
