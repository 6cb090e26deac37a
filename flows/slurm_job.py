"""The pipeline as one Slurm job that the flow submits and watches (flow parameter `slurm`).

The job is the one `python -m stages.slurm submit` submits: the same batch script, its size from
params.yaml's `slurm` section with the `SlurmJob` fields that are set taking precedence. While it
runs, the flow logs every state change of the job and every line of its log (appended across
requeues), tags the flow run `slurm-job-<id>` and keeps the markdown artifact `unite-slurm-job`
(job id, state, log path) current. The job's outputs (dvc.lock, metrics) land in the same checkout,
which on a cluster lies on a filesystem every node sees.
"""

import re
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from prefect import get_client
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from flows.dvc_commands import PlannedStage, StageResult
from flows.processes import terminal_line

JOB_KEY = "unite-slurm-job"
JOB_TAG = "slurm-job-{job_id}"
# DVC's lines about a stage (dvc/stage/run.py, dvc/stage/__init__.py, dvc/stage/cache.py).
_STAGE_LINES = (
    (re.compile(r"Running stage '([^']+)'"), "ran"),
    (re.compile(r"Stage '([^']+)' didn't change, skipping"), "up to date"),
    (re.compile(r"Stage '([^']+)' is cached - skipping run"), "restored from run-cache"),
)


class SlurmJob(BaseModel):
    """Run the pipeline as one Slurm job (as `python -m stages.slurm submit`); a field left unset
    takes its value from the `slurm` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    nodes: int | None = Field(None, description="nodes")
    tasks_per_node: int | None = Field(None, description="torchrun launchers per node")
    gpus_per_node: int | None = Field(None, description="GPUs per node (each torchrun stage's nproc_per_node)")
    cpus_per_task: int | None = Field(None, description="CPUs per task")
    time: str | None = Field(None, description="time limit, e.g. 24:00:00")
    partition: str | None = Field(None, description="partition")
    signal_seconds: int | None = Field(None, description="the time-limit warning comes this long before it")
    max_requeues: int | None = Field(None, description="requeues at the time limit before the job gives up")


class JobLog:
    """The job's log as it grows: each new line goes to `on_line`; the lines in which DVC says what
    it did with a stage are kept, with when the flow read them, for the run's summary, and the
    last lines for the error of a failed job."""

    def __init__(self, path: Path, on_line: Callable[[str], None], clock: Callable[[], float]) -> None:
        self.path, self.on_line, self.clock = path, on_line, clock
        self.offset = 0
        self.partial = b""
        self.events: list[tuple[str, str, float]] = []  # (stage, outcome, when read)
        self.tail: deque[str] = deque(maxlen=20)

    def read(self) -> None:
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
        except FileNotFoundError:  # Slurm creates it when the job starts
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            line = terminal_line(raw)
            if not line.strip():
                continue
            self.on_line(line)
            self.tail.append(line)
            for pattern, outcome in _STAGE_LINES:
                if found := pattern.search(line):
                    self.events.append((found[1], outcome, self.clock()))

    def results(self, plan: Sequence[PlannedStage], end: float) -> list[StageResult]:
        """What DVC last did with each planned stage (a requeued job repeats stages), in plan order;
        seconds from its line to DVC's next stage line, as the flow read them."""
        last: dict[str, StageResult] = {}
        for index, (stage, outcome, start) in enumerate(self.events):
            stop = self.events[index + 1][2] if index + 1 < len(self.events) else end
            last[stage] = StageResult(stage, outcome, round(stop - start, 1))
        return [last[stage.name] for stage in plan if stage.name in last]


def show_job(job_id: str, log: Path, states: Sequence[str], host: str) -> None:
    """A new version of the `unite-slurm-job` artifact: the job, its state so far, its log."""
    lines = [
        f"# Slurm job {job_id}: {states[-1]}",
        f"- states: {' -> '.join(states)}",
        f"- log: `{log}` (on the filesystem the cluster shares)",
        f"- submitted from `{host}`; `squeue -j {job_id}` shows it, Cancel of this flow run runs `scancel {job_id}`",
    ]
    create_markdown_artifact("\n".join(lines), key=JOB_KEY, description=f"Slurm job {job_id}: {states[-1]}")


def tag_run(job_id: str) -> None:
    """Tag this flow run with the job id: the runs list shows it."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.get_id())
        client.update_flow_run(run.id, tags=[*run.tags, JOB_TAG.format(job_id=job_id)])
