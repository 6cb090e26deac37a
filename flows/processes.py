"""Run a command in its own process group, stream its output line by line, stop the whole group.

Every command runs in its own session (process group). Its merged stdout/stderr goes line by line
to a callback as it arrives (`PYTHONUNBUFFERED=1` for Python commands; carriage-return progress
bars keep their last state). When the command must stop early (flow cancelled: the runner's
SIGTERM reaches the flow as `TerminationSignal`, or the `tick` callback raises; task timeout;
Ctrl-C) the whole group gets SIGTERM and, after `kill_grace_s`, SIGKILL, so `torchrun` workers die
with it. Processes the command leaves behind after its leader exits are stopped the same way.
"""

import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

KILL_GRACE_S = 10.0
POLL_S = 0.2


def terminal_line(raw: bytes) -> str:
    """What a terminal would show for one output line: the text after the last carriage return."""
    segments = [s for s in raw.decode("utf-8", "replace").rstrip("\r\n").split("\r") if s]
    return segments[-1] if segments else ""


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(terminal_line(raw))
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
    `tick` is called at every poll and line, and stops the command by raising.
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
