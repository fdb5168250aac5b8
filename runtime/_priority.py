"""Thread priorities: the one place the runtime lowers a thread's CPU priority (bulk prepare pool, serve workers).

Linux schedules threads, not processes: a priority set here applies to the calling thread only, and
threads it starts inherit it. Lowering one's own priority needs no privilege; raising it back does,
so both helpers are meant for a pool's `initializer`, on threads that stay low for their lifetime.
With autogroup scheduling (the default on desktop and most server kernels) these only rank the
threads of one session against each other, not against other users' processes.
"""

from __future__ import annotations

import os
import threading

__all__ = ["PRIORITIES", "lower_thread_priority", "set_thread_priority"]

# normal: as the caller. idle: SCHED_IDLE, run only when no normal thread of this session wants the
# core, and preempted at once when one wakes (nice 19 where SCHED_IDLE does not exist).
PRIORITIES = ("normal", "idle")


def lower_thread_priority(nice: int) -> None:
    """Run the calling thread `nice` steps below its current priority (at most nice 19).

    Args:
        nice: steps to lower by; 0 leaves the thread as it is. Where the OS has no per-thread
            priority, or refuses, the thread keeps its priority.
    """
    if nice and hasattr(os, "setpriority"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError:
            pass


def set_thread_priority(priority: str) -> None:
    """Give the calling thread one of `PRIORITIES`.

    Args:
        priority: "normal" (nothing changes) or "idle" (SCHED_IDLE on Linux, else nice 19).
    Raises:
        ValueError: an unknown priority name.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}; got {priority!r}")
    if priority == "normal":
        return
    if hasattr(os, "SCHED_IDLE"):
        try:
            # pid 0 is the calling thread (Linux applies scheduling policies per thread)
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            pass
    lower_thread_priority(19)
