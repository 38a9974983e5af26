"""A reload that tells the truth: SIGHUP to every worker, then each one's outcome.

Each worker checks the new code in a child process (it imports, and with
``--reload-check-path`` answers a GET below 500), then drains and reloads in place; it
records the outcome beside its scoreboard slot (``<pid>.reload``: checking, refused
with the check's output, reloaded). This waits for every worker's record of this
reload and says what each did; a refusal is an error, with its traceback, while the
old code goes on serving. A refusal is shown as a person reads it (``readable``): the
last traceback of a chain, at most ``LIMIT`` lines; the worker's log has it whole.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from fcgi.ops.scoreboard import read_reload
from fcgi.reload import CHECK_TIMEOUT

from .config import Config
from .settings import stop_wait
from .stack import StackError
from .supervisor import Supervisor, alive


@dataclass
class Outcome:
    name: str  # app:app_00
    pid: int
    state: str  # reloaded, refused, gone
    detail: str = ""
    log: Path | None = None  # the worker's log, which has the refusal whole


def reload(config: Config) -> list[Outcome]:
    """Reload every worker of the pool; their outcomes once all are known."""
    sup = Supervisor(config.state)
    if not sup.running():
        raise StackError("not running: fcgi-finish start (make start)")
    board = config.state / "run" / "scoreboard"
    pool = sup.pool()
    down = [p for p in pool if p.state != "RUNNING"]
    if down:
        raise StackError(
            "not every worker runs, so a reload cannot reach them all: "
            + ", ".join(f"{p.full_name} {p.state}" for p in down)
            + "; fcgi-finish restart starts them with the new code"
        )
    before = {p.pid: (read_reload(board, p.pid) or {}).get("attempt", 0) for p in pool}
    sup.signal_pool("HUP")
    deadline = time.monotonic() + CHECK_TIMEOUT + stop_wait(config["FCGI_GRACEFUL_TIMEOUT"])
    waiting = {p.pid: p for p in pool}
    outcomes: list[Outcome] = []
    while waiting and time.monotonic() < deadline:
        for pid, proc in list(waiting.items()):
            record = read_reload(board, pid)
            log = config.state / "log" / f"{proc.name}.log"
            if record and record["attempt"] > before[pid] and record["state"] != "checking":
                outcome = Outcome(proc.full_name, pid, record["state"], record["detail"], log)
                outcomes.append(outcome)
                del waiting[pid]
            elif not alive(pid):
                outcomes.append(Outcome(proc.full_name, pid, "gone", _tail(log), log))
                del waiting[pid]
        time.sleep(0.05)
    for pid, proc in waiting.items():
        outcomes.append(Outcome(proc.full_name, pid, "late", "no outcome in time"))
    return sorted(outcomes, key=lambda o: o.name)


def report(outcomes: list[Outcome]) -> tuple[str, bool]:
    """What each worker did, and whether every one serves the new code."""
    lines = []
    shown: dict[str, str] = {}  # a refusal's text: the first worker that showed it
    for o in outcomes:
        if o.state == "reloaded":
            lines.append(f"{o.name} (pid {o.pid}): reloaded, serving the new code")
        elif o.state == "refused" and o.detail in shown:  # the pool's workers alike
            lines.append(
                f"{o.name} (pid {o.pid}): refused the new code, as {shown[o.detail]} did; "
                f"the old code keeps serving"
            )
        elif o.state == "refused":
            shown[o.detail] = o.name
            lines.append(
                f"{o.name} (pid {o.pid}): refused the new code; the old code keeps serving:"
            )
            lines.append("    " + readable(o.detail, o.log).replace("\n", "\n    "))
        elif o.state == "gone":
            lines.append(f"{o.name} (pid {o.pid}): exited while reloading; its log ends:")
            lines.append("    " + o.detail.replace("\n", "\n    "))
        else:
            lines.append(f"{o.name} (pid {o.pid}): {o.detail}")
    ok = bool(outcomes) and all(o.state == "reloaded" for o in outcomes)
    return "\n".join(lines) + "\n", ok


LIMIT = 60  # lines of a refusal shown per worker
_CHAINED = re.compile(
    r"\n\n(?:During handling of the above exception, another exception occurred"
    r"|The above exception was the direct cause of the following exception):\n\n"
)
_CARETS = re.compile(r"\s*[\^~]+\s*")  # the lines under a frame that point at its code


def readable(detail: str, log: Path | None = None, limit: int = LIMIT) -> str:
    """A refusal as a person reads it: of a chain of tracebacks (Django's error page
    failing on the same import, again and again), the line it began with, the first
    one's error and the last traceback whole; at most ``limit`` lines, the middle cut,
    with how many lines were cut and where the whole text is (``log``)."""
    total = len(detail.splitlines())
    chain = _CHAINED.split(detail)
    if len(chain) > 1:
        first = chain[0].splitlines()
        before = first[: next((i for i, ln in enumerate(first) if ln.startswith("Traceback")), 0)]
        lines = [
            *before,
            f"(the last of {len(chain)} chained tracebacks; the first ended: {first[-1].strip()})",
            *chain[-1].splitlines(),
        ]
    else:
        lines = detail.splitlines()
    lines = [ln for ln in lines if not _CARETS.fullmatch(ln)]
    if len(lines) > limit:
        head, tail = 4, limit - 6  # what failed and where; a traceback ends with its cause
        middle = len(lines) - head - tail
        lines = [*lines[:head], f"    ... {middle} lines ...", *lines[-tail:]]
        total += 1  # the line just added is none of the text's
    cut = total - len(lines)
    if cut > 0:
        where = f"; the whole text is in {log}" if log else ""
        lines.append(f"({cut} of {total} lines cut{where})")
    return "\n".join(lines)


def _tail(path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no {path})"
