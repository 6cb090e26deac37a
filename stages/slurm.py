"""The pipeline as one Slurm job: `python -m stages.slurm submit [options] [-- DVC COMMAND]`.

The batch script runs the DVC command (`dvc repro` unless given, e.g. `-- exp run -n big`) on the
allocation's first node, so DVC's repository lock is taken only once the job runs. The train, sweep
and evaluate stages see UNITE_SRUN and start one torchrun per task with srun (stages.launch); every
other stage runs on the first node. The script stops at the first error, so a failed stage fails
the job.

Time limit: Slurm sends the batch script SIGUSR1 `signal_seconds` before the limit; the script
sends SIGTERM to the job's steps (training finishes its step and writes a checkpoint), lets DVC
fail the stage, and requeues the job, at most `max_requeues` times (SLURM_RESTART_COUNT counts
them; each requeue is logged). The requeued job runs the same DVC command, which resumes training.

Cancel: `scancel` (or Ctrl-C of `submit --wait`, or SIGTERM to it) sends every process of the job
SIGTERM once: training writes its checkpoint, and Slurm kills what is left after its KillWait. DVC
runs as `python -m stages.slurm dvc ...`, which leaves SIGTERM to its stage and ends when the stage
does: killed outright, DVC could be halfway through rewriting .dvc/tmp/rwlock (as it does the moment
a stage ends) and leave it empty, which stops every later DVC command in the checkout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stages.launch import SRUN_ENV, TORCHRUN_STAGES
from stages.params import PARAMS_FILE, load_params
from unite.config import ConfigError

JOB_FOLDER = Path(".dvc/tmp/slurm")  # batch scripts and logs: ignored by git, seen by every node
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}
POLL_S = 1.0


class SlurmError(RuntimeError):
    """Slurm refused or is missing; the message says what to do."""


def _require(program: str) -> str:
    found = shutil.which(program)
    if not found:
        raise SlurmError(f"{program} not found: run this where Slurm's client commands are installed (a login "
                         "node), or start the one-host cluster of the README (`scripts/slurm-local start DIR`)")
    return found


def job_settings(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's slurm section with the command line's values, checked against the stages'
    nproc_per_node."""
    settings = {**params["slurm"], **{k: v for k, v in overrides.items() if v is not None}}
    for key in ("nodes", "tasks_per_node", "max_requeues", "signal_seconds", "gpus_per_node"):
        least = 0 if key in ("max_requeues", "gpus_per_node") else 1
        if settings[key] < least:
            raise ConfigError(f"slurm.{key}={settings[key]}: must be >= {least}")
    if settings["gpus_per_node"]:
        for stage in TORCHRUN_STAGES:
            nproc = params[stage]["nproc_per_node"]
            per_task = settings["gpus_per_node"] // settings["tasks_per_node"]
            if nproc != per_task:
                raise ConfigError(
                    f"{stage}.nproc_per_node={nproc}: must equal slurm.gpus_per_node / slurm.tasks_per_node = "
                    f"{per_task} (one process per GPU)")
    return settings


def batch_script(settings: dict[str, Any], dvc_args: list[str], log: Path, root: Path) -> str:
    """The sbatch script: its #SBATCH lines ask for the allocation, its body runs DVC on node 0,
    turns the time-limit warning into a checkpoint and a requeue, and fails when DVC fails."""
    options = [f"--job-name=unite-{root.name}", f"--nodes={settings['nodes']}",
               f"--ntasks-per-node={settings['tasks_per_node']}", f"--time={settings['time']}",
               f"--signal=B:USR1@{settings['signal_seconds']}", "--requeue", "--open-mode=append",
               f"--output={log}", f"--chdir={root}"]
    if settings["gpus_per_node"]:
        options.append(f"--gpus-per-node={settings['gpus_per_node']}")
    if settings["cpus_per_task"]:
        options.append(f"--cpus-per-task={settings['cpus_per_task']}")
    if settings["partition"]:
        options.append(f"--partition={settings['partition']}")
    options += [str(arg) for arg in settings["sbatch_args"]]
    dvc = shlex.join([sys.executable, "-m", "stages.slurm", "dvc", *dvc_args])
    max_requeues = settings["max_requeues"]
    header = "\n".join(f"#SBATCH {option}" for option in options)
    return f"""#!/bin/bash
{header}
# Written by `python -m stages.slurm submit`: runs `{shlex.join(['dvc', *dvc_args])}` on the first node.
set -euo pipefail
export {SRUN_ENV}=1 PYTHONUNBUFFERED=1
restarts=${{SLURM_RESTART_COUNT:-0}}
echo "unite: job $SLURM_JOB_ID, run $((restarts + 1)), on $SLURM_JOB_NODELIST, $(date -Is)"
time_up=0
stage_processes() {{
    # What DVC runs, all the way down (its shell may fork, as dash does), but not srun: srun turns
    # a SIGTERM of its own into a SIGKILL of its step, whose workers scancel signals instead.
    local pid
    for pid in $(pgrep -P "$1"); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = srun ] && continue
        echo "$pid"
        stage_processes "$pid"
    done
    return 0
}}
on_time_limit() {{
    time_up=1
    echo "unite: the time limit is near: the job's steps get SIGTERM (training writes its checkpoint)"
    scancel --signal=TERM "$SLURM_JOB_ID" || true  # the steps: train, sweep and evaluate's workers
    kill -TERM $(stage_processes "$dvc_pid") 2>/dev/null || true  # the stage (a launcher waits for its workers)
}}
cancelled=0
signalled=" "
on_cancel() {{
    # Slurm has sent SIGTERM to every process of the job; DVC leaves it to its stage and ends after it.
    cancelled=1
    for pid in $(stage_processes "$dvc_pid"); do signalled="$signalled$pid "; done
    echo "unite: cancelled: the stage gets SIGTERM (training writes its checkpoint); DVC ends after it"
}}
{dvc} &
dvc_pid=$!
trap on_time_limit USR1
trap on_cancel TERM
# A trapped signal interrupts `wait`: wait again until DVC has exited, then take its status. Once
# cancelled, a stage that DVC starts after the cancel (it finished the last one meanwhile) gets
# SIGTERM too.
while kill -0 "$dvc_pid" 2>/dev/null; do
    if [ "$cancelled" = 1 ]; then
        for pid in $(stage_processes "$dvc_pid"); do
            case "$signalled" in
                *" $pid "*) ;;
                *) kill -TERM "$pid" 2>/dev/null || true; signalled="$signalled$pid " ;;
            esac
        done
        sleep 1
    else
        wait "$dvc_pid" || true
    fi
done
status=0
wait "$dvc_pid" || status=$?
if [ "$cancelled" = 1 ]; then
    echo "unite: cancelled; \\`{shlex.join(['dvc', *dvc_args])}\\` ended with exit status $status" >&2
    exit "$status"
fi
if [ "$status" -ne 0 ] && [ "$time_up" = 1 ]; then
    # The requeue would kill a step still writing its checkpoint: wait for every step to end.
    while squeue -h -s -j "$SLURM_JOB_ID" -o %i | grep -qv -e '\\.batch$' -e '\\.extern$'; do sleep 1; done
    if [ "$restarts" -lt {max_requeues} ]; then
        echo "unite: requeue $((restarts + 1)) of at most {max_requeues} (slurm.max_requeues): the next run resumes"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "unite: error: the time limit was reached after {max_requeues} requeues (slurm.max_requeues), the" \\
         "bound: no further requeue. Training's checkpoint is kept: submit again to resume from it, with a" \\
         "longer --time or a larger --max-requeues" >&2
fi
if [ "$status" -ne 0 ]; then
    echo "unite: error: \\`{shlex.join(['dvc', *dvc_args])}\\` failed with exit status $status" >&2
else
    echo "unite: done, $(date -Is)"
fi
exit "$status"
"""


def job_state(job_id: str) -> tuple[str, int]:
    """The job's state and exit status, as `scontrol show job` tells while Slurm remembers the job."""
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SlurmError(f"job {job_id}: scontrol show job failed: {shown.stderr.strip()}")
    fields = dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
    return fields["JobState"], int(fields.get("ExitCode", "0:0").split(":")[0])


def follow(job_id: str, on_state: Callable[[str], None], tick: Callable[[], None] | None = None) -> tuple[str, int]:
    """Poll the job until it has ended and left the queue (squeue no longer lists it); `on_state` gets
    each new state, `tick` runs at every poll and stops following by raising. Returns the last
    state and exit status."""
    last = None
    while True:
        if tick is not None:
            tick()
        state, status = job_state(job_id)
        if state != last:
            on_state(state)
            last = state
        if state not in ACTIVE_STATES:
            return state, status
        time.sleep(POLL_S)


def exit_status(state: str, status: int) -> int:
    """0 for a completed job, 1 for a cancelled one (whatever DVC's status as its stage was
    stopped), else its exit status (1 when it had none)."""
    if state == "COMPLETED":
        return 0
    return 1 if state == "CANCELLED" else status or 1


def cancel(job_id: str, on_state: Callable[[str], None]) -> str:
    """scancel the job (every process gets SIGTERM once: training writes its checkpoint; Slurm kills
    what is left after its KillWait) and wait until it has left the queue; returns its last state."""
    subprocess.run(["scancel", job_id], check=False)
    return follow(job_id, on_state)[0]


def wait_for(job_id: str) -> int:
    """Wait until the job has ended and left the queue; returns its `exit_status`. Ctrl-C or
    SIGTERM cancels the job and still waits for its processes, so that training writes its
    checkpoint; a second Ctrl-C stops waiting."""
    # Ctrl-C cancels even where this process was started with SIGINT ignored (a parent's choice).
    previous = {number: signal.signal(number, signal.default_int_handler)
                for number in (signal.SIGINT, signal.SIGTERM)}

    def report(state: str) -> None:
        print(f"unite: job {job_id}: {state}", flush=True)

    try:
        try:
            return exit_status(*follow(job_id, report))
        except KeyboardInterrupt:
            print(f"unite: cancelling job {job_id}; waiting for its processes (training writes its "
                  "checkpoint; Ctrl-C again to stop waiting)", file=sys.stderr, flush=True)
            cancel(job_id, report)
            return 130
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def submit(settings: dict[str, Any], dvc_args: list[str], root: Path,
           env: Mapping[str, str] | None = None) -> tuple[str, Path]:
    """Write the batch script under .dvc/tmp/slurm and sbatch it, with `env` added to this process's
    environment (which the job inherits); returns the job id and its log."""
    sbatch = _require("sbatch")
    folder = root / JOB_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    script = folder / f"job-{stamp}.sh"
    log = folder / f"job-{stamp}.log"
    script.write_text(batch_script(settings, dvc_args, log, root))
    submitted = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True,
                               env={**os.environ, **(env or {})})
    if submitted.returncode != 0:
        raise SlurmError(f"sbatch {script} failed: {submitted.stderr.strip()}; fix the slurm section of "
                         f"{PARAMS_FILE} or the command line's options")
    return submitted.stdout.strip().split(";")[0], log


def run_dvc(dvc_args: list[str]) -> int:
    """DVC as the batch script runs it: Slurm's SIGTERM, which every process of a cancelled job gets,
    is left to the stage that DVC runs, so that DVC ends after its stage and releases its locks
    instead of being killed halfway through rewriting them. Its stages start with SIGTERM's default
    action (a Python handler does not outlive exec)."""
    from dvc.cli import main as dvc_main

    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    return dvc_main(dvc_args)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("submit", help="submit the pipeline (or any DVC command) as one Slurm job")
    sub.add_argument("--nodes", type=int, help="nodes (default: slurm.nodes)")
    sub.add_argument("--tasks-per-node", type=int, help="torchrun launchers per node (default: slurm.tasks_per_node)")
    sub.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: slurm.gpus_per_node)")
    sub.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: slurm.cpus_per_task)")
    sub.add_argument("--time", help="time limit, e.g. 24:00:00 (default: slurm.time)")
    sub.add_argument("--partition", help="partition (default: slurm.partition)")
    sub.add_argument("--signal-seconds", type=int, help="warning before the limit (default: slurm.signal_seconds)")
    sub.add_argument("--max-requeues", type=int, help="requeues at the time limit (default: slurm.max_requeues)")
    sub.add_argument("--wait", action="store_true", help="wait for the job to end; exit with its status")
    sub.add_argument("dvc_args", nargs="*", metavar="-- DVC COMMAND",
                     help="what node 0 runs, after `--` (default: repro), e.g. -- exp run -n big")
    dvc = commands.add_parser("dvc", help="run DVC as the batch script does: SIGTERM is left to its stage")
    dvc.add_argument("dvc_args", nargs=argparse.REMAINDER, metavar="DVC COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dvc"]:  # every argument after it is DVC's, options included
        return run_dvc(argv[1:])
    args = arguments().parse_args(argv)
    root = Path.cwd()
    try:
        params = load_params()
        overrides = {key: getattr(args, key) for key in ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task",
                                                         "time", "partition", "signal_seconds", "max_requeues")}
        settings = job_settings(params, overrides)
        job_id, log = submit(settings, args.dvc_args or ["repro"], root)
        print(f"unite: submitted job {job_id}; log: {log}", flush=True)
        return wait_for(job_id) if args.wait else 0
    except (ConfigError, SlurmError, FileNotFoundError) as error:
        suffix = f"; fix it in {PARAMS_FILE} or on the command line" if isinstance(error, ConfigError) else ""
        print(f"error: slurm: {error}{suffix}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
