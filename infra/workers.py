"""`loopcast worker --processes N`: one deployment as N worker processes. Each is a member of its
stages' consumer groups, so Kafka spreads the partitions over them (and over other machines running
the same command); the warehouse owner and the HTTP endpoints run in the first only, the sending
stages in the others.
The supervisor restarts a process that dies and stops them all together."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from streams.topology import StageSpec, select

log = logging.getLogger("loopcast.workers")

# A process that keeps dying is not restarted forever: the supervisor gives up and says so.
MAX_RESTARTS = 5


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_processes(stages: Sequence[StageSpec] | None = None) -> int:
    """One sending process per core, plus the warehouse owner where the stages (default: all) have both.
    The owner needs less than a core (it waits on inserts), so with one process per core in all, a
    core stayed partly idle while the sending process was saturated (bench, 2 cores: 3.6k msg/s with
    two processes, 4.0k with three)."""
    plan = layout(stages if stages is not None else select(None), 2)
    return cores() + 1 if cores() > 1 and len(plan) == 2 and plan[0] != plan[1] else cores()


def layout(stages: Sequence[StageSpec], processes: int) -> list[list[str]]:
    """The stage names each process runs. The warehouse owner (the feedback family: chDB allows one
    process per data directory) runs in the first process only, with the monitor, the other reader of
    the outcomes; every other process runs the sending stages. Sharing their partitions with the owner
    instead left it twice as busy as the rest (its receipts, inserts and outcome reads on top), and the
    whole loop went at the pace of that one core: a burst ran at 2.2k msg/s with two processes that way,
    3.6k with this split (bench)."""
    names = [s.name for s in stages]
    owner = [n for n in names if n.split(".")[0] in ("feedback", "monitor")]
    sending = [n for n in names if n not in owner]
    if not owner:
        return [names] * processes
    if processes == 1 or not sending:
        return [names]
    return [owner] + [sending] * (processes - 1)


def _die_with_parent() -> None:
    # A supervisor killed outright must not leave its workers behind (Linux: PR_SET_PDEATHSIG).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except OSError:
        pass


def supervise(stages: Sequence[StageSpec], processes: int, loglevel: str) -> int:
    plan = layout(stages, processes)

    def start(names: list[str]) -> subprocess.Popen:
        argv = [sys.executable, "-m", "console", "worker", "--processes", "1", "--loglevel", loglevel]
        return subprocess.Popen([*argv, "--stages", ",".join(names)], preexec_fn=_die_with_parent)

    children = [start(names) for names in plan]
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts = 0
    while not stopping:
        for i, child in enumerate(children):
            code = child.poll()
            if code is None or stopping:
                continue
            if restarts >= MAX_RESTARTS:
                log.error("worker process %d keeps exiting (code %s); stopping the deployment", i, code)
                stopping = True
                break
            restarts += 1
            log.warning("worker process %d exited with code %s; starting it again", i, code)
            children[i] = start(plan[i])
        time.sleep(0.2)  # a supervisor's poll, not synchronisation
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + 30
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0 if restarts < MAX_RESTARTS else 1
