"""``make demo``: run the seed experiment against the running stack and judge it.

    python -m wsgi_app.demo_client http://127.0.0.1:8080/demo var/log/demo.log

Fetches /demo as a visitor would, prints how long the visitor waited, waits
for the worker to log ``end-time``, prints that run's log lines and a verdict:
PASS when the page had arrived before ``start-proceed`` and ``end-time``.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

EVENTS = ("start-time", "start-proceed", "end-time")


def read_events(log: Path, demo_id: str) -> dict[str, float]:
    """The demo log's timestamps for one run, by event name."""
    events: dict[str, float] = {}
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            event, _, rest = line.partition(":")
            stamp, _, tail = rest.partition(" ")
            if f"id={demo_id}" in tail.split():
                events[event] = float(stamp)
    return events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the demo page, e.g. http://127.0.0.1:8080/demo")
    parser.add_argument("log", type=Path, help="the demo log the workers write")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for end-time (default: 30)"
    )
    args = parser.parse_args(argv)

    sent = time.time()
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as resp:
            body = resp.read().decode("utf-8", "replace")
            demo_id = resp.headers.get("X-Demo-Id", "")
    except (urllib.error.URLError, OSError) as exc:
        print(
            f"cannot fetch {args.url}: {exc}; is the stack running? (make start)", file=sys.stderr
        )
        return 2
    answered = time.time()
    print(f"visitor waited {1000 * (answered - sent):.0f} ms and got: {body.strip()!r}")
    if not demo_id:
        print(
            "the response has no X-Demo-Id header: is this the fcgi-finish demo?", file=sys.stderr
        )
        return 2

    deadline = time.monotonic() + args.timeout
    events = read_events(args.log, demo_id)
    while "end-time" not in events and time.monotonic() < deadline:
        time.sleep(0.2)
        events = read_events(args.log, demo_id)
    for event in EVENTS:
        if event in events:
            print(
                f"  {event}:{events[event]:.6f}  (+{events[event] - events[EVENTS[0]]:.3f} s)"
                if EVENTS[0] in events
                else f"  {event}:{events[event]:.6f}"
            )
        else:
            print(f"  {event}: missing from {args.log}")

    ok = (
        all(e in events for e in EVENTS)
        and answered < events["start-proceed"]
        and answered < events["end-time"]
        and "debug..." not in body
    )
    if ok:
        print(
            f"PASS: the page arrived {events['end-time'] - answered:.1f} s before end-time; "
            "the worker did the rest after the response"
        )
    else:
        print("FAIL: the page did not arrive before the deferred part ran (or a line is missing)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
