"""The pool status page, in PHP-FPM's fields and formats.

Plain text by default, ``?json`` with PHP-FPM's field names (so monitoring
that reads PHP-FPM reads this unchanged), ``?openmetrics`` for Prometheus,
``?html`` as PHP-FPM's HTML table (refreshing itself every 5 s, ``refresh=N``
changes it, 0 stops it); ``?full`` adds one entry per process. This project's own
fields (deferred work, reloads) follow PHP-FPM's in each format.
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from .scoreboard import Scoreboard

OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def pool_status(board: Scoreboard, pool_name: str, full: bool) -> dict[str, Any]:
    """The status as PHP-FPM names it, plus the deferred-work fields."""
    now = time.time()
    slots = board.read_all(sample=False)  # the refresher samples: never the serving thread
    pool = board.pool()
    active = [s for s in slots if s["busy_since"]]
    data: dict[str, Any] = {
        "pool": pool_name,
        "process manager": "static",
        "start time": int(pool["start_time"]),
        "start since": int(now - pool["start_time"]),
        "accepted conn": sum(s["accepted"] for s in slots),
        "listen queue": 0,
        "max listen queue": 0,
        "listen queue len": 0,
        "idle processes": len(slots) - len(active),
        "active processes": len(active),
        "total processes": len(slots),
        "max active processes": max(pool["max_active"], len(active)),
        "max children reached": pool["max_children_reached"]
        + sum(s["children_reached"] for s in slots),
        "slow requests": sum(s["slow"] for s in slots),
        "request timeouts": pool["request_timeouts"],
    }
    for key in ("queued", "running", "done", "failed", "abandoned"):
        data[f"deferred {key}"] = sum(s["deferred_" + key] for s in slots)
    data["last deferred duration"] = round(max((s["last_deferred"] for s in slots), default=0), 6)
    for key in ("pending", "dead"):  # one journal for the pool: the freshest look, not a sum
        data[f"deferred journal {key}"] = max(
            (s[f"deferred_journal_{key}"] for s in slots), default=0
        )
    data["reloads"] = sum(s["reloads"] for s in slots)
    data["reloads refused"] = sum(s["reloads_refused"] for s in slots)
    if full:
        data["processes"] = [_process(s, now) for s in slots]
    return data


def _process(slot: dict[str, Any], now: float) -> dict[str, Any]:
    busy = bool(slot["busy_since"])
    duration = now - slot["busy_since"] if busy else slot["last_duration"]
    return {
        "pid": slot["pid"],
        "state": "Running" if busy else "Idle",
        "start time": int(slot["start_time"]),
        "start since": int(now - slot["start_time"]),
        "requests": slot["requests"],
        "request duration": int(duration * 1_000_000),  # microseconds, as PHP-FPM
        "request method": slot["method"] or "-",
        "request uri": slot["uri"] or "-",
        "content length": slot["content_length"],
        "user": "-",
        "script": "-",
        "last request cpu": 0.0,
        "last request memory": 0,
        "deferred queued": slot["deferred_queued"],
        "deferred running": slot["deferred_running"],
        "deferred done": slot["deferred_done"],
        "deferred failed": slot["deferred_failed"],
        "deferred abandoned": slot["deferred_abandoned"],
        "last deferred duration": round(slot["last_deferred"], 6),
        "reloads": slot["reloads"],
    }


def render(data: dict[str, Any], query: str) -> tuple[str, bytes]:
    """(content type, body) in the format the query string asks for."""
    flags = dict(part.partition("=")[::2] for part in query.split("&"))
    if "json" in flags:
        return "application/json", json.dumps(data).encode()
    if "openmetrics" in flags:
        return OPENMETRICS_TYPE, _openmetrics(data).encode()
    if "html" in flags:
        refresh = flags.get("refresh", "")
        seconds = int(refresh) if refresh.isdigit() else 5
        return "text/html; charset=utf-8", _html(data, seconds).encode()
    return "text/plain; charset=utf-8", _text(data).encode()


def _html(data: dict[str, Any], refresh: int) -> str:
    """PHP-FPM's ?html: a table of the pool's fields, then one of the processes with a
    header row; the page reloads itself every ``refresh`` seconds (0: never)."""
    esc = html.escape
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">' + meta,
        f"<title>{esc(str(data['pool']))}: pool status</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;"
        "margin-bottom:1em}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "th{background:#eee}</style></head><body>",
        '<table id="pool">',
    ]
    for key, value in data.items():
        if key != "processes":
            out.append(f"<tr><th>{esc(key)}</th><td>{esc(str(value))}</td></tr>")
    out.append("</table>")
    procs = data.get("processes")
    if procs:
        out.append('<table id="processes">')
        out.append("<tr>" + "".join(f"<th>{esc(k)}</th>" for k in procs[0]) + "</tr>")
        for proc in procs:
            out.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in proc.values()) + "</tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _text(data: dict[str, Any]) -> str:
    lines = [f"{key + ':':<21} {value}" for key, value in data.items() if key != "processes"]
    for proc in data.get("processes", []):
        lines.append("\n" + "*" * 24)
        lines += [f"{key + ':':<21} {value}" for key, value in proc.items()]
    return "\n".join(lines) + "\n"


# name, type, help, samples as (extra label, status field): one row per metric family.
_METRICS = (
    ("fcgi_start_time_seconds", "gauge", "When the pool started.", [("", "start time")]),
    (
        "fcgi_accepted_connections",
        "counter",
        "Requests accepted by the pool (PHP-FPM's accepted conn).",
        [("", "accepted conn")],
    ),
    (
        "fcgi_processes",
        "gauge",
        "Worker processes by state.",
        [('state="idle"', "idle processes"), ('state="active"', "active processes")],
    ),
    (
        "fcgi_max_active_processes",
        "gauge",
        "Most processes seen active at once.",
        [("", "max active processes")],
    ),
    (
        "fcgi_max_children_reached",
        "counter",
        "Requests that found every process busy.",
        [("", "max children reached")],
    ),
    (
        "fcgi_slow_requests",
        "counter",
        "Requests that ran past --slow-request.",
        [("", "slow requests")],
    ),
    (
        "fcgi_request_timeouts",
        "counter",
        "Requests given up on past --request-timeout (each reloads its worker).",
        [("", "request timeouts")],
    ),
    (
        "fcgi_deferred",
        "gauge",
        "Deferred calls waiting or running now.",
        [('state="queued"', "deferred queued"), ('state="running"', "deferred running")],
    ),
    (
        "fcgi_deferred_calls",
        "counter",
        "Deferred calls ended, by outcome.",
        [(f'outcome="{o}"', f"deferred {o}") for o in ("done", "failed", "abandoned")],
    ),
    (
        "fcgi_deferred_journal",
        "gauge",
        "Calls in the deferred journal: pending (any worker), dead (python -m wsgi_app.journal).",
        [
            ('state="pending"', "deferred journal pending"),
            ('state="dead"', "deferred journal dead"),
        ],
    ),
    (
        "fcgi_reloads",
        "counter",
        "Reloads in place, by outcome.",
        [('outcome="reloaded"', "reloads"), ('outcome="refused"', "reloads refused")],
    ),
    (
        "fcgi_last_deferred_duration_seconds",
        "gauge",
        "How long the last deferred call took.",
        [("", "last deferred duration")],
    ),
)


def _openmetrics(data: dict[str, Any]) -> str:
    pool = data["pool"].replace("\\", "\\\\").replace('"', '\\"')
    out: list[str] = []
    for name, kind, help_, samples in _METRICS:
        out.append(f"# TYPE {name} {kind}")
        out.append(f"# HELP {name} {help_}")
        suffix = "_total" if kind == "counter" else ""
        for extra, field in samples:
            labels = f'pool="{pool}"' + (f",{extra}" if extra else "")
            out.append(f"{name}{suffix}{{{labels}}} {data[field]}")
    out.append("# EOF")
    return "\n".join(out) + "\n"
