"""Binding a worker to one CPU (``--cpu-affinity``).

A worker's threads take turns on one GIL. When a deferred call's thread takes
it on another core, the serving thread waits for it to come back across cores
(a wake-up between cores, cold caches), and that costs more than the call's
own work: one plain deferred call per twenty hello-world requests cost 370 µs
of CPU each with the worker free to move, 112 µs with it bound to one CPU (see
docs/performance.md). Bound, the turns are cheap, and no core is lost: one
thread runs Python at a time anyway. Processes the worker starts for work of
their own (the deferred helper, commands after the response) use every CPU
the worker was allowed, which ``FCGI_CPUS`` keeps for them and for a reload
(the reload's import check too: ``unbind_thread``).

``auto`` claims a CPU no other worker of the pool holds: one lock file per CPU in
the pool's folder (``claim``), locked with a POSIX lock for the worker's life, so
a worker's death frees its CPU and a restarted worker takes a free one whatever
its pid. A reload in place keeps the pid and the lock's file descriptor, so the
next interpreter keeps the CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

ENV = "FCGI_CPUS"  # the CPUs the worker was allowed before it bound itself
LOCK_ENV = "FCGI_CPU_LOCK"  # "FD:CPU:INODE": the lock ``auto`` holds, kept across a reload's exec
LEVELS = 64  # workers per CPU claimed apart; past that many, auto leaves a worker unbound

log = logging.getLogger("fcgi")


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


def bind(choice: str | int, pool: Path | None = None) -> int | None:
    """Bind this process (and every thread it starts later) to one CPU: ``auto`` claims
    the CPU held by the fewest workers of ``pool`` (a folder; see ``claim``), a number
    picks ``allowed()[n % len]``. Returns the CPU, or None when not bound (``off``, one
    CPU only, or auto with no folder to claim in)."""
    if choice == "off":
        return None
    cpus = allowed()
    for _ in range(2):
        if len(cpus) < 2:
            return None
        if choice == "auto":
            cpu = claim(pool, cpus) if pool is not None else None
            if cpu is None:
                return None
        else:
            cpu = cpus[int(choice) % len(cpus)]
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:  # FCGI_CPUS names a CPU no longer ours (a narrowed cpuset)
            _release()  # the lock of that CPU, if claimed: it would be held for nothing
            os.environ.pop(ENV, None)
            cpus = sorted(os.sched_getaffinity(0))
            continue
        os.environ[ENV] = ",".join(map(str, cpus))
        return cpu
    return None


def claim(pool: Path, cpus: list[int]) -> int | None:
    """Lock ``cpu<N>.<level>.lock`` in ``pool`` for the first free level, trying every
    CPU at level 0 first: workers never share a CPU while one is free, and spread
    evenly past that. The lock (and so the CPU) is this process's until it dies; the
    descriptor stays open across a reload's exec, which keeps the CPU (``LOCK_ENV``).
    None when no lock file can be made (the folder is not writable): binding blind
    could put two workers on one CPU."""
    kept = _kept_lock(cpus)
    if kept is not None:
        return kept
    try:
        pool.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("--cpu-affinity auto: cannot use %s (%s); not bound to a CPU", pool, exc)
        return None
    opened = False
    for level in range(LEVELS):
        for cpu in cpus:
            try:
                fd = os.open(pool / f"cpu{cpu}.{level}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                continue  # another user's file: not ours to tell
            opened = True
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # held by another worker (closing drops no lock of ours)
                continue
            os.set_inheritable(fd, True)  # kept by a reload's exec, and the lock with it
            os.environ[LOCK_ENV] = f"{fd}:{cpu}:{os.fstat(fd).st_ino}"
            return cpu
        if not opened:
            break
    log.warning("--cpu-affinity auto: no CPU lock free in %s; not bound to a CPU", pool)
    return None


def _kept_lock(cpus: list[int]) -> int | None:
    """The CPU whose lock this process held before a reload's exec, if it still does."""
    fields = os.environ.pop(LOCK_ENV, "").split(":")
    if len(fields) != 3 or not all(f.isascii() and f.isdigit() for f in fields):
        return None
    fd, cpu, inode = map(int, fields)
    try:
        if os.fstat(fd).st_ino != inode:
            return None  # not the lock's descriptor any more: not ours to close
        if cpu not in cpus:
            os.close(fd)  # a CPU this process may no longer use: give its lock up
            return None
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: this only confirms
    except OSError:
        return None
    os.environ[LOCK_ENV] = ":".join(fields)
    return cpu


def _release() -> None:
    """Close the descriptor of the CPU lock this process claimed, and so the lock."""
    fields = os.environ.pop(LOCK_ENV, "").split(":")
    if len(fields) == 3 and fields[0].isascii() and fields[0].isdigit():
        with contextlib.suppress(OSError):
            os.close(int(fields[0]))


def unbind_thread() -> None:
    """Let the calling thread (and the processes it starts) use every CPU the worker was
    allowed: for a thread that only waits on a process of its own."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, allowed())
