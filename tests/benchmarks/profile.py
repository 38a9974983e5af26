"""Instructions and system calls per request of one worker, repeatable on a busy machine.

``python -m tests.benchmarks.profile [APP] [--requests N] [--every K]`` (default: hello
world, 4,000 requests; ``--every 20``: every 20th to /defer?0.1)
captures the request nginx sends with the shipped nginx.conf, then replays it over one
kept connection to a worker run under ``valgrind --tool=callgrind`` and under
``strace -c -f``. callgrind counts only while N requests are served, after 200 to warm
up (twice, to show it repeats); strace runs with N and with 2N requests, and the
difference divided by N is what one request costs, with startup and shutdown out.
Wall-clock figures on a shared machine swing with the neighbours; these do not.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.fcgi_client import HEADER, Client
from tests.procs import ROOT, connectable, nginx, python_env, require, stop, wait_for

END_REQUEST = 3
STDIN = 5


def captured_request(tmp: Path, path: str = "/") -> bytes:
    """The records nginx sends for ``GET path`` through the shipped nginx.conf."""
    tmp = tmp / f"capture-{len(list(tmp.glob('capture-*')))}"
    tmp.mkdir()
    sock_path = tmp / "capture.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    listener.listen(1)
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        data = b""
        while True:  # to the empty STDIN record that ends the request
            data += conn.recv(65536)
            pos = 0
            while len(data) - pos >= 8:
                _, rtype, rid, clen, plen = HEADER.unpack_from(data, pos)
                pos += 8 + clen + plen
                if rtype == STDIN and clen == 0 and pos <= len(data):
                    got.append(data[:pos])
                    out = b"Status: 200 OK\r\nContent-Length: 0\r\n\r\n"
                    conn.sendall(
                        HEADER.pack(1, 6, rid, len(out), 0)
                        + out
                        + HEADER.pack(1, END_REQUEST, rid, 8, 0)
                        + bytes(8)
                    )
                    conn.close()
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with nginx(tmp / "nginx", sock_path) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path, headers={"User-Agent": "wrk"})
        conn.getresponse().read()
        conn.close()
    thread.join(10)
    listener.close()
    return got[0]


def replay(sock: Path, request: bytes, count: int, every: tuple[int, bytes] | None = None) -> None:
    """``count`` requests over one kept connection, one after the other; ``every``:
    (n, other) sends ``other`` instead as every nth request."""
    client = Client(str(sock), timeout=600)
    for i in range(1, count + 1):
        client.send(every[1] if every and i % every[0] == 0 else request)
        response = client.read_response()
        assert response.status == 200, response.head
    client.close()


@contextlib.contextmanager
def worker_under(tool: list[str], tmp: Path, app: str, args: list[str]):
    sock = tmp / "app.sock"
    sock.unlink(missing_ok=True)
    cmd = [*tool, sys.executable, "-m", "fcgi", "--bind", f"unix:{sock}", *args, app]
    log = open(tmp / "worker.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=python_env(), stdout=log, stderr=log)
    try:
        wait_for(lambda: proc.poll() is not None or connectable(str(sock)), 300, "the worker")
        assert proc.poll() is None, (tmp / "worker.log").read_text()
        yield sock, proc.pid
    finally:
        # strace runs the worker as its child: the signal goes to the worker itself
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        with contextlib.suppress(OSError, ValueError, IndexError):
            if tool[0].endswith("strace"):
                os.kill(int(children.read_text().split()[0]), signal.SIGTERM)
        stop(proc, timeout=300)
        log.close()


def instructions(tmp: Path, app: str, args: list[str], request: bytes, count: int, every) -> int:
    """Instructions the worker ran while it served ``count`` requests (after 200 to warm
    up): callgrind collects only in that window (``callgrind_control -i``), so neither
    startup nor what runs by the clock while a slow valgrind starts counts."""
    out = tmp / f"callgrind.{count}"
    valgrind = require("valgrind", "valgrind")
    tool = [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    control = str(Path(valgrind).with_name("callgrind_control"))
    with worker_under(tool, tmp, app, args) as (sock, pid):
        replay(sock, request, 200, every)
        subprocess.run([control, "-i", "on", str(pid)], check=True, capture_output=True)
        replay(sock, request, count, every)
        subprocess.run([control, "-i", "off", str(pid)], check=True, capture_output=True)
    text = out.read_text(errors="replace")
    return int(re.search(r"^totals: (\d+)", text, re.M).group(1))


def syscalls(tmp: Path, app: str, args: list[str], request: bytes, count: int, every):
    out = tmp / f"strace.{count}"
    tool = [require("strace", "strace"), "-f", "-c", "-o", str(out)]
    with worker_under(tool, tmp, app, args) as (sock, _):
        replay(sock, request, count, every)
    calls = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("app", nargs="?", default="tests.benchmarks.apps:hello")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument(
        "--every", type=int, default=0, help="every Nth request goes to --other-path instead"
    )
    parser.add_argument("--other-path", default="/defer?0.1")
    parser.add_argument("worker_args", nargs="*", help="after --: options for the worker")
    opts = parser.parse_args()
    n = opts.requests
    args = ["--log-level", "warning", *opts.worker_args]
    with tempfile.TemporaryDirectory(prefix="fcgi-profile-") as name:
        tmp = Path(name)
        request = captured_request(tmp)
        every = (opts.every, captured_request(tmp, opts.other_path)) if opts.every else None
        runs = [instructions(tmp, opts.app, args, request, n, every) / n for _ in range(2)]
        print(
            f"{opts.app}: {min(runs):,.0f} instructions per request (callgrind, "
            f"{n:,} requests, two runs: {', '.join(f'{r:,.0f}' for r in runs)})"
        )
        if not opts.no_strace:
            few, many = (syscalls(tmp, opts.app, args, request, c, every) for c in (n, 2 * n))
            per = {k: (many.get(k, 0) - few.get(k, 0)) / n for k in many}
            per = {k: v for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.01}
            print(
                f"{sum(per.values()):.2f} system calls per request (strace -c): "
                + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
