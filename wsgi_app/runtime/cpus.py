"""The CPU policy of deferred work: its threads are background work for the kernel,
and the processes it starts (the helper, a command after the response) use every
CPU the worker was allowed, not the one the worker may have bound itself to.

The worker says which CPUs it was allowed through the environ's ``fcgi.cpus``
(``set_allowed``, from the middleware): the two packages meet only there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

_allowed: list[int] = []  # the worker's CPUs before it bound itself; empty: not bound


def background() -> None:
    """Mark the calling thread as background work (Linux ``SCHED_BATCH``); elsewhere a no-op.

    On the worker's one CPU, a thread that wakes (a call to start, a sleep that ended)
    would preempt the serving thread at once, find the GIL held and give the CPU back:
    a convoy of context switches that cost the serving thread more than the call did
    (13 switches per deferred call, measured). A batch thread waits for the serving
    thread's time slice to end, or for its ``sched_yield``, and keeps its full share
    of the CPU. Processes it starts inherit the policy, as background work too.
    """
    with contextlib.suppress(AttributeError, OSError):  # not Linux; a sandbox refusing it
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def set_allowed(cpus: Sequence[int]) -> None:
    """The CPUs the worker was allowed before it bound itself to one (the environ's
    ``fcgi.cpus``, handed on by the middleware)."""
    _allowed[:] = [int(cpu) for cpu in cpus]


def use_every_cpu() -> None:
    """Let this thread (and what it starts) use every CPU the worker was allowed: a
    command or the deferred helper has a GIL of its own, or none, and is not to share
    the worker's core."""
    cpus = _allowed
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def every_cpu() -> Iterator[None]:
    """``use_every_cpu`` while a process is started (it inherits this thread's CPUs), then
    this thread goes back to the worker's."""
    before = os.sched_getaffinity(0)
    use_every_cpu()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)
