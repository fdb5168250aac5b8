"""Thread priorities (runtime/_priority.py): they change the calling thread only, and never fail a run."""

from __future__ import annotations

import os
import threading

import pytest

from huse.runtime._priority import lower_thread_priority, set_thread_priority


def _in_thread(fn):
    out = {}

    def run():
        fn()
        tid = threading.get_native_id()
        out["nice"], out["policy"] = os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(0)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="per-thread priorities are tested on Linux")
def test_priorities_apply_to_the_calling_thread_only():
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), os.sched_getscheduler(0)
    assert _in_thread(lambda: set_thread_priority("idle"))["policy"] == os.SCHED_IDLE
    assert _in_thread(lambda: set_thread_priority("normal")) == {"nice": before[0], "policy": before[1]}
    assert _in_thread(lambda: lower_thread_priority(5))["nice"] == min(19, before[0] + 5)
    assert _in_thread(lambda: lower_thread_priority(50))["nice"] == 19  # capped, not an error
    assert (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), os.sched_getscheduler(0)) == before


def test_unknown_priority_names_the_known_ones():
    with pytest.raises(ValueError, match=r"one of \('normal', 'idle'\); got 'high'"):
        set_thread_priority("high")
