"""Binding a worker to one CPU (``--cpu-affinity``).

A worker's threads take turns on one GIL. When a deferred call's thread takes
it on another core, the serving thread waits for it to come back across cores
(a wake-up between cores, cold caches), and that costs more than the call's
own work: one plain deferred call per twenty hello-world requests cost 370 µs
of CPU each with the worker free to move, 112 µs with it bound to one CPU (see
the README, Performance). Bound, the turns are cheap, and no core is lost: one
thread runs Python at a time anyway. Processes the worker starts for work of
their own (the deferred helper, commands after the response) use every CPU
the worker was allowed, which ``FCGI_CPUS`` keeps for them and for a reload
(the reload's import check too: ``unbind_thread``).
"""

from __future__ import annotations

import contextlib
import os

ENV = "FCGI_CPUS"  # the CPUs the worker was allowed before it bound itself


def cpu_choice(text: str) -> str | int:
    """``auto``, ``off`` or a CPU index (taken modulo the CPUs allowed)."""
    if text in ("auto", "off"):
        return text
    if text.isascii() and text.isdigit() and len(text) < 6:
        return int(text)
    raise ValueError("must be auto, off or a CPU index such as 0")


def allowed() -> list[int]:
    """The CPUs this process may use, as it was started (before any binding)."""
    text = os.environ.get(ENV, "")
    if text:
        with contextlib.suppress(ValueError):
            return [int(cpu) for cpu in text.split(",")]
    return sorted(os.sched_getaffinity(0))


def bind(choice: str | int) -> int | None:
    """Bind this process (and every thread it starts later) to one CPU: ``auto`` picks
    one by pid, a number picks ``allowed()[n % len]`` (a pool's workers spread by
    their index). Returns the CPU, or None when not bound (``off``, or one CPU only)."""
    if choice == "off":
        return None
    index = os.getpid() if choice == "auto" else int(choice)
    cpus = allowed()
    for _ in range(2):
        if len(cpus) < 2:
            return None
        cpu = cpus[index % len(cpus)]
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:  # FCGI_CPUS names a CPU no longer ours (a narrowed cpuset)
            os.environ.pop(ENV, None)
            cpus = sorted(os.sched_getaffinity(0))
            continue
        os.environ[ENV] = ",".join(map(str, cpus))
        return cpu
    return None


def unbind_thread() -> None:
    """Let the calling thread (and the processes it starts) use every CPU the worker was
    allowed: for a thread that only waits on a process of its own."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, allowed())
