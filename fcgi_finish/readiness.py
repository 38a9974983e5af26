"""Whether a start worked: every program RUNNING and this stack's nginx answering its
status page with every worker, or the first line of a log that says why not (nginx
cannot bind, the app raises while it loads), shown with the lines after it.

Only what a start writes counts: the logs' sizes are noted before it (``LogMarks``).
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import time
from pathlib import Path

from .supervisor import Supervisor

TIMEOUT = 60.0  # seconds a start may take before it is called failed


def connect_host(listen: str) -> tuple[str, int]:
    """Where to reach nginx on ``listen`` from this machine."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


def get(listen: str, tls: bool, path: str, timeout: float = 5.0):
    """(response, body) of GET ``path`` from nginx on ``listen``; TLS unverified, since it
    is this machine's own nginx, whatever its certificate."""
    host, port = connect_host(listen)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def ours(resp: http.client.HTTPResponse, state: Path) -> bool:
    """Whether an answer came from this stack's nginx (its header names the state folder)."""
    return resp.getheader("X-Fcgi-Finish-Var") == str(state)


class LogMarks:
    """Where each log of the stack ends before a start, to read only that start's lines."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.marks = {p: p.stat().st_size for p in self.logs() if p.exists()}

    def logs(self) -> list[Path]:
        log = self.state / "log"
        return [*sorted(log.glob("app_*.log")), log / "nginx-error.log"]

    def new_lines(self, path: Path) -> list[str]:
        try:
            with open(path, "rb") as f:
                f.seek(self.marks.get(path, 0))
                return f.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return []

    def problem(self, listen: str) -> str | None:
        """What this start's logs say went wrong, if anything yet."""
        nginx_log = self.state / "log" / "nginx-error.log"
        for line in self.new_lines(nginx_log):
            if "[emerg]" in line:
                bind = re.search(r"bind\(\) to (\S+) failed \((\d+): ([^)]*)\)", line)
                if bind:
                    return (
                        f"nginx cannot listen on {bind.group(1)}: {bind.group(3)}. See which "
                        "program has it with `ss -ltnp`; stop it, or choose another port: "
                        f"fcgi-finish start --listen HOST:PORT (now {listen})"
                    )
                return f"nginx cannot start: {line}\n(in {nginx_log})"
        for path in self.logs()[:-1]:
            text = "\n".join(self.new_lines(path))
            if "the app's traceback" in text or "fcgi-serve: error:" in text:
                _settle(path)  # the rest of the traceback may still be on its way
                return f"the app does not load ({path}):\n" + "\n".join(self.new_lines(path))
        return None


def _settle(path: Path, quiet: float = 0.3, limit: float = 3.0) -> None:
    """Wait until ``path`` stops growing (supervisord copies output as it comes)."""
    deadline = time.monotonic() + limit
    size = -1
    while time.monotonic() < deadline and path.stat().st_size != size:
        size = path.stat().st_size
        time.sleep(quiet)


def wait_running(
    supervisor: Supervisor, marks: LogMarks, listen: str, tls: bool, numprocs: int
) -> str | None:
    """None once every program is RUNNING and the status page shows ``numprocs``
    workers through this stack's nginx; else why not (a log's lines, or the states)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        problem = marks.problem(listen)
        if problem:
            return problem
        procs = supervisor.processes()
        if (
            procs
            and all(p.state == "RUNNING" for p in procs)
            and _pool_answers(marks.state, listen, tls, numprocs)
        ):
            return None
        failed = [p for p in procs if p.state in ("FATAL", "EXITED", "BACKOFF")]
        if failed and all(p.state == "FATAL" for p in failed):
            return (
                "gave up starting: "
                + ", ".join(f"{p.full_name} {p.state}" for p in failed)
                + (f"; see {marks.state}/log/")
            )
        time.sleep(0.1)
    states = "\n".join(f"  {p.full_name:<14} {p.state:<9} {p.description}" for p in procs)
    return (
        f"the stack did not answer on {listen}/fcgi-status with {numprocs} worker(s) within "
        f"{TIMEOUT:.0f} s:\n{states}\nsee {marks.state}/log/"
    )


def _pool_answers(state: Path, listen: str, tls: bool, numprocs: int) -> bool:
    try:
        resp, body = get(listen, tls, "/fcgi-status?json", timeout=2)
        return (
            ours(resp, state)
            and resp.status == 200
            and json.loads(body)["total processes"] == numprocs
        )
    except (OSError, ValueError, KeyError, http.client.HTTPException):
        return False
