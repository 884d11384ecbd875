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

from streams.topology import FRONT_HALF, STAGES, StageSpec, select

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
    return cores() + 1 if cores() > 1 and owner_of(plan) is not None else cores()


def layout(stages: Sequence[StageSpec], processes: int, halves: bool = False) -> list[list[str]]:
    """The stage names each process runs.

    The warehouse owner (the feedback family: chDB allows one process per data directory) runs in the first
    process only, with the monitor, the other reader of the outcomes. Sharing the sending stages' partitions
    with it instead left it twice as busy as the rest (its receipts, inserts and outcome reads on top), and
    the whole loop went at the pace of that one core (bench, two processes: 2.2k msg/s that way, 3.6k apart).

    The other processes run the sending stages, each sharing every stage's partitions. With `halves`, two or
    more take turns at the halves of the send path instead (match and render; throttle and dispatch): each
    stage reads all its partitions in fewer processes, so its batches are bigger and the loop makes about
    half the Kafka, Redis and provider requests per message. That is for steady traffic: at a steady 1k/s on
    2 cores p99 went from ~160 ms to 58 ms and the broker's CPU halved (50-message steps: p99 44 → 27 ms);
    a later round's probe gave 83 ms against 146-169. A burst is slower that way (20k and 60k events:
    4.4-4.9k msg/s against 5.0-5.5k; later 4.6-4.7k against 4.6-5.4k), as each half waits for the other to
    fill and to drain, so the default shares."""
    names = [s.name for s in stages]
    owner = [s.name for s in stages if not s.send_path]
    sending = [s.name for s in stages if s.send_path]
    if processes == 1 or not sending:
        return [names]
    senders = processes - 1 if owner else processes
    front = [n for n in sending if n.split(".")[0] in FRONT_HALF]
    back = [n for n in sending if n not in front]
    lanes = [front, back] if halves and front and back and senders > 1 else [sending]
    return ([owner] if owner else []) + [lanes[i % len(lanes)] for i in range(senders)]


def _die_with_parent() -> None:
    # A supervisor killed outright must not leave its workers behind (Linux: PR_SET_PDEATHSIG).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except OSError:
        pass


def child_setup(niceness: int):
    """What a worker process does before it runs: die with the supervisor, take its CPU priority (before
    any thread starts, so every thread inherits it)."""

    def prepare() -> None:
        _die_with_parent()
        if niceness:
            os.nice(niceness)

    return prepare


def owner_of(plan: list[list[str]]) -> int | None:
    """The process of the plan that runs the warehouse apart from the sending stages, if one does."""
    by_name = {s.name: s for s in STAGES}
    return 0 if len(plan) > 1 and not any(by_name[n].send_path for n in plan[0]) else None


def supervise(
    stages: Sequence[StageSpec], processes: int, loglevel: str, owner_nice: int = 0, halves: bool = False
) -> int:
    """`owner_nice`: how much lower the warehouse owner's CPU priority is than the sending processes'
    (its threads too, chDB's merges among them): reports can catch up, a send cannot wait. After a burst
    the owner's inserts and merges took both cores for 50-100 ms at a time, and every hop stalled."""
    plan = layout(stages, processes, halves)
    owner = owner_of(plan)

    def start(index: int) -> subprocess.Popen:
        argv = [sys.executable, "-m", "console", "worker", "--processes", "1", "--loglevel", loglevel]
        prepare = child_setup(owner_nice if index == owner else 0)
        return subprocess.Popen([*argv, "--stages", ",".join(plan[index])], preexec_fn=prepare)

    children = [start(i) for i in range(len(plan))]
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
            children[i] = start(i)
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
