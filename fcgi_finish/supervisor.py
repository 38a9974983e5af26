"""Talking to the stack's supervisord: over its unix socket, with supervisor's own
XML-RPC transport (what supervisorctl uses), so no command line is parsed back."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

POOL = "app"  # the [fcgi-program:app] group


@dataclass(frozen=True)
class Process:
    """One program as supervisord reports it."""

    group: str
    name: str
    state: str  # RUNNING, STARTING, BACKOFF, FATAL, EXITED, STOPPED, ...
    pid: int
    description: str

    @property
    def full_name(self) -> str:
        return f"{self.group}:{self.name}" if self.group != self.name else self.name


class Supervisor:
    """The supervisord of one state folder."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.conf = state / "run" / "supervisord.conf"
        self.socket = state / "run" / "supervisor.sock"
        self.pidfile = state / "run" / "supervisord.pid"

    def _call(self, method: str, *args: Any) -> Any:
        """One XML-RPC call on a connection of its own (closed after it)."""
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        try:
            proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
            return getattr(proxy.supervisor, method)(*args)
        finally:
            transport.close()

    def running(self) -> bool:
        """Whether this state folder's supervisord answers."""
        if not self.socket.exists():
            return False
        try:
            return self._call("getState")["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def processes(self) -> list[Process]:
        return [
            Process(p["group"], p["name"], p["statename"], p["pid"], p["description"])
            for p in self._call("getAllProcessInfo")
        ]

    def pool(self) -> list[Process]:
        return [p for p in self.processes() if p.group == POOL]

    def signal_pool(self, name: str) -> None:
        self._call("signalProcessGroup", POOL, name)

    def start_daemon(self, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        """supervisord in the background (it forks and the first process exits)."""
        return subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def exec_foreground(self, env: Mapping[str, str]) -> None:
        """Become supervisord in the foreground (fcgi-finish run, the systemd unit)."""
        sys.stdout.flush()
        argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)]
        os.execve(sys.executable, argv, dict(env))

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def shutdown(self, timeout: float = 90.0) -> list[int]:
        """Stop supervisord and everything it runs; wait until every process is gone.
        Returns the pids still alive at the timeout (none, normally)."""
        pids = {p.pid for p in self.processes() if p.pid}
        main = self.pid()
        if main:
            pids.add(main)
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            self._call("shutdown")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = [pid for pid in pids if alive(pid)]
            if not left:
                return []
            time.sleep(0.1)
        return [pid for pid in pids if alive(pid)]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it has exited, its parent not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"
