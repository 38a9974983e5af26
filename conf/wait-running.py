#!/usr/bin/env python3
"""`make start`'s checks, so it never says "running" unless the stack answers.

    wait-running.py before LISTEN VAR
        fail at once if nothing can listen on LISTEN (another program has the port),
        and note where each log ends, so `after` reads only this start's lines
    wait-running.py after LISTEN VAR NUMPROCS SUPERVISORCTL...
        wait until nginx on LISTEN answers the status page as this stack (the
        X-Fcgi-Finish-Var header names VAR) with NUMPROCS workers; fail as soon as a
        log says why not (nginx cannot bind, the app raises while loading), showing
        those lines, or after TIMEOUT seconds (env WAIT_TIMEOUT, default 30)

Standard library only: it runs with the virtualenv's python before anything else.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def logs(var: Path) -> list[Path]:
    return [*sorted((var / "log").glob("app_*.log")), var / "log" / "nginx-error.log"]


def before(listen: str, var: Path) -> None:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "another program is listening there" if exc.errno == 98 else exc.strerror
            fail(
                f"nginx cannot listen on {listen} (port {port}): {why}. See which with "
                f"`ss -ltnp 'sport = :{port}'`; stop it, or choose another port: "
                f"make start NGINX_LISTEN={host}:{port + 1}"
            )
    marks = {str(p): p.stat().st_size for p in logs(var) if p.exists()}
    (var / "run" / "log-marks.json").write_text(json.dumps(marks))


def new_lines(path: Path, marks: dict[str, int]) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(marks.get(str(path), 0))
            return f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return []


def settle(path: Path, quiet: float = 0.3, limit: float = 3.0) -> None:
    """Wait until ``path`` stops growing (supervisord copies output as it comes)."""
    deadline = time.monotonic() + limit
    size = -1
    while time.monotonic() < deadline and path.stat().st_size != size:
        size = path.stat().st_size
        time.sleep(quiet)


def why_not(var: Path, marks: dict[str, int], listen: str) -> str | None:
    """What the logs of this start say went wrong, if anything yet."""
    nginx_log = var / "log" / "nginx-error.log"
    for line in new_lines(nginx_log, marks):
        if "[emerg]" in line:
            bind = re.search(r"bind\(\) to (\S+) failed \((\d+): ([^)]*)\)", line)
            if bind:
                return (
                    f"nginx cannot listen on {bind.group(1)}: {bind.group(3)}. See which "
                    f"program has it with `ss -ltnp`; stop it, or choose another port: "
                    f"make start NGINX_LISTEN=... (now {listen})"
                )
            return f"nginx cannot start: {line}\n(in {nginx_log})"
    for path in logs(var)[:-1]:
        text = "\n".join(new_lines(path, marks))
        if "the app's traceback" in text or "fcgi-serve: error:" in text:
            settle(path)  # the rest of the traceback may still be on its way
            return f"the app does not load ({path}):\n" + "\n".join(new_lines(path, marks))
    return None


def answers(listen: str, var: Path, numprocs: int) -> bool:
    host, port = split_listen(listen)
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/fcgi-status?json")
        resp = conn.getresponse()
        body = resp.read()
    except OSError:
        return False
    finally:
        conn.close()
    if resp.getheader("X-Fcgi-Finish-Var") != str(var):
        return False  # not this stack's nginx, or no worker behind it yet
    try:
        return resp.status == 200 and json.loads(body)["total processes"] == numprocs
    except (ValueError, KeyError):
        return False


def after(listen: str, var: Path, numprocs: int, ctl: list[str]) -> None:
    try:
        marks = json.loads((var / "run" / "log-marks.json").read_text())
    except FileNotFoundError:
        marks = {}
    deadline = time.monotonic() + float(os.environ.get("WAIT_TIMEOUT", "30"))
    while time.monotonic() < deadline:
        if answers(listen, var, numprocs):
            return
        problem = why_not(var, marks, listen)
        if problem:
            fail(problem)
        time.sleep(0.2)
    status = subprocess.run([*ctl, "status"], capture_output=True, text=True).stdout
    fail(
        f"the stack did not answer on http://{listen}/fcgi-status with {numprocs} "
        f"worker(s) in time:\n{status}see {var}/log/"
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["before"] and len(argv) == 3:
        before(argv[1], Path(argv[2]))
    elif argv[:1] == ["after"] and len(argv) >= 5:
        after(argv[1], Path(argv[2]), int(argv[3]), argv[4:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
