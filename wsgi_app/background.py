"""Start a command after the response: PHP's ``exec("cmd > /dev/null &")`` / ``nohup``, kept.

    from wsgi_app.background import run_after

    def app(environ, start_response):
        run_after(environ, ["convert", "in.png", "-resize", "50%", "out.png"], timeout=60)
        ...

The command starts once the visitor has the response, as a deferred call, so it
is in the executor's counts, the access log's deferred line and (with a journal)
survives the worker's death. The helper waits for it and reaps it (never a
zombie), kills its whole process group after ``timeout`` seconds, and logs its
exit status with the tail of its output and the request it came from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .deferred import defer
from .runtime.cpus import every_cpu

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

log = logging.getLogger("wsgi_app.deferred")

TAIL = 2000  # bytes of output kept for the log
GRACE = 5.0  # seconds between SIGTERM and SIGKILL at the timeout


def run_after(
    environ: WSGIEnvironment,
    args: Sequence[str],
    *,
    timeout: float = 300.0,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run ``args`` (no shell) after this request's response; see the module docstring."""
    request = environ.get("fcgi.request_id") or (
        f"{environ.get('REQUEST_METHOD', '-')} {environ.get('PATH_INFO', '')}"
    )
    env_dict = dict(env) if env is not None else None
    defer(environ, run_command, list(args), timeout, cwd, env_dict, request)


def run_command(
    args: list[str],
    timeout: float = 300.0,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    request: str = "-",
) -> int:
    """Run ``args`` to its end (or ``timeout``), reap it, log how it ended; its status."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: output can never block it
        with every_cpu():  # the worker's own CPU is not the command's
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,  # its own group: the timeout kills its children too
            )
        killed = False
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            killed = True
            status = _kill(proc)
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - TAIL))
        tail = out.read().decode("utf-8", "replace").rstrip()
    seconds = time.monotonic() - started
    how = f"killed after {timeout:g} s timeout" if killed else f"exited {status}"
    level = logging.INFO if status == 0 and not killed else logging.ERROR
    log.log(
        level,
        "command %s %s after %.1f s (request %s)%s",
        args,
        how,
        seconds,
        request,
        f"; output ends:\n{tail}" if tail else "; no output",
    )
    return status


def _kill(proc: subprocess.Popen) -> int:
    """SIGTERM to the command's group, then SIGKILL to whatever of it is left after
    ``GRACE`` s (sent before the leader is reaped, so the group id is still its own);
    then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline:
        exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if exited is not None:
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()
