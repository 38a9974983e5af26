"""A helper process for deferred work (the ``process`` setting): calls run outside
the serving process's GIL, as uWSGI's mules do.

The helper is forked from the worker at its first deferred call, so it has the
app's modules as loaded. Each batch travels as one pickled message over a
``SOCK_SEQPACKET`` pair (one send, whole or not at all, never blocking the
serving thread); the helper runs it on an executor of its own (the same pool
and loop) and reports each call's start and end back, a tick's worth per
message, to one reader thread here, where the counts live.

What it asks of users: the callable and its arguments must pickle (functions
by module and name; a lambda, a closure or an open connection does not, and
such a batch runs in the worker as usual, logged once per function), and the
call sees the process as it was at the fork, so it opens its own connections
and its writes to module state stay in the helper.

A ``contextvars.Context`` does not pickle, so a call here runs in a fresh, empty
context: the request's context variables (structlog's bound fields, Sentry's
scope, your own) are at their defaults. What crosses is the request (its origin
and id, in every line logged about the call) and its place in the trace: the
W3C ``traceparent`` of the span current at ``defer()``, from which the call's
span is a child of the request's, as in the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from . import tracing
from .calls import Batch, Call, State
from .cpus import background, use_every_cpu

log = logging.getLogger("wsgi_app.deferred")

MESSAGE_LIMIT = 1 << 16  # bytes: a batch pickled larger than this runs in the worker
REPORT_EVENTS = 500  # events per report message, well under MESSAGE_LIMIT
BUFFER = 4 << 20  # socket buffer: room for thousands of batches in flight
TICK = 0.02  # seconds between the helper's reports
ORPHAN_TIMEOUT = 10.0  # seconds a helper whose worker died gives its work before it exits


class Helper:
    """The worker's side: sends batches, reads reports, stops the helper at a drain."""

    def __init__(
        self,
        settings: dict[str, Any],
        report: Callable[[Batch, int, State, float], None],
        executor_class: Callable[..., Any],
    ) -> None:
        # report(batch, index, state, when): each start and end, ``when`` its
        # time.monotonic() in the helper (CLOCK_MONOTONIC: the same clock here);
        # executor_class(**settings): what runs the batches in the helper
        self.report = report
        # batches sent and not over, by id; _lock orders a send (the batch in the map, then
        # on the socket, or out again) against a death (the map emptied): a batch is the
        # helper's, or the worker's to run, never both and never neither
        self.batches: dict[int, Batch] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._unpicklable: set[str] = set()
        self.drained = threading.Event()
        self.dead = False  # it died without being asked to stop: the next batch forks anew
        self._drain_asked = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        self.parent = os.getpid()
        with warnings.catch_warnings():  # 3.12+ warns of fork() beside threads: the
            warnings.simplefilter("ignore", DeprecationWarning)  # helper starts its own
            self.pid = os.fork()
        if self.pid == 0:  # the helper
            ours.close()
            _helper_main(theirs, settings, executor_class)
        theirs.close()
        self.sock = ours
        threading.Thread(target=self._read, name="deferred-helper-reader", daemon=True).start()
        log.info("deferred work runs in helper process %d", self.pid)

    def send(self, batch: Batch) -> bool:
        """Hand ``batch`` to the helper; False if it cannot go (it runs here then)."""
        with self._lock:
            self._seq += 1
            bid = self._seq
        calls = [
            (call.func, call.args, call.kwargs, tracing.traceparent(call.context))
            for call in batch.calls
        ]
        message = ("batch", bid, batch.origin, batch.request_id, calls)
        try:
            data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        except Exception:
            name = batch.calls[0].name
            if name not in self._unpicklable:
                self._unpicklable.add(name)
                log.info("deferred %s cannot be pickled: it runs in the worker", name)
            return False
        if len(data) > MESSAGE_LIMIT:
            return False
        with self._lock:
            if self.dead:
                return False
            self.batches[bid] = batch
            try:
                self.sock.send(data, socket.MSG_DONTWAIT)  # never blocks: under the lock
            except OSError:  # helper busy (buffer full) or gone: run it here
                del self.batches[bid]
                return False
        return True

    def request_drain(self, timeout: float) -> None:
        """Ask the helper to finish its work within ``timeout`` s, then stop."""
        self._drain_asked = True
        with contextlib.suppress(OSError):
            self.sock.send(pickle.dumps(("drain", max(0.0, timeout - 0.3))))

    def close(self, timeout: float) -> None:
        """After ``request_drain``: wait up to ``timeout`` s for the helper's last report,
        kill it if late, and close the socket."""
        if not self.drained.wait(timeout):
            log.error("deferred helper process %d did not stop in time; killing it", self.pid)
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.sock.close()

    def _read(self) -> None:
        background()
        while True:
            try:
                data = self.sock.recv(MESSAGE_LIMIT)
            except OSError:
                data = b""
            if not data:
                break
            events = pickle.loads(data)
            if events == "drained":
                break
            with self._lock:
                found = []
                for bid, index, state, when in events:
                    batch = self.batches.get(bid)
                    if batch is not None:
                        if index == len(batch.calls):  # the batch is over
                            del self.batches[bid]
                        found.append((batch, index, state, when))
            for batch, index, state, when in found:
                self.report(batch, index, State(state), when)
        if not self._drain_asked:
            self._died()
        self.drained.set()

    def _died(self) -> None:
        """The helper is gone unasked (a call ran os._exit, a signal, the OOM killer):
        say so now, end each call it held (failed if it was running, abandoned if it
        had not started), and let the next batch fork a new helper."""
        status = "unknown status"
        with contextlib.suppress(ChildProcessError):
            _, code = os.waitpid(self.pid, 0)
            status = (
                f"signal {os.WTERMSIG(code)}"
                if os.WIFSIGNALED(code)
                else f"exit {os.waitstatus_to_exitcode(code)}"
            )
        log.error(
            "deferred helper process %d died (%s); its next batch forks a new one", self.pid, status
        )
        now = time.monotonic()
        with self._lock:  # a send under way ends first: its batch is in, or runs here
            self.dead = True
            lost = list(self.batches.values())
            self.batches.clear()
        for batch in lost:
            for index, call in enumerate(batch.calls):
                if call.state.ended:
                    continue
                running = call.state is State.RUNNING
                log.error(
                    "deferred %s lost with helper process %d, %s %s",
                    call.describe(),
                    self.pid,
                    "while it ran" if running else "not reported started",
                    batch.label(),
                    extra=tracing.log_fields(batch, call),
                )
                self.report(batch, index, State.FAILED if running else State.ABANDONED, now)
            self.report(batch, len(batch.calls), State.DONE, now)


def _helper_main(sock: socket.socket, settings: dict[str, Any], executor_class: Any) -> None:
    """The helper process: run batches on ``executor_class(**settings)`` until told to
    drain (or the worker is gone)."""
    code = 0
    try:
        use_every_cpu()  # its own GIL: no reason to share the worker's CPU
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the worker decides when the helper stops
        _close_sockets(keep=sock.fileno())
        executor = executor_class(**settings)
        executor.summary = False  # the worker logs the totals
        events: list[tuple[int, int, str, float]] = []
        lock = threading.Lock()
        ids: dict[int, int] = {}  # id(batch) -> the worker's batch id

        def note(batch: Batch, call: Call | None = None) -> None:
            index = len(batch.calls) if call is None else batch.calls.index(call)
            state = State.DONE if call is None else call.state
            when = call.began if state is State.RUNNING else time.monotonic()
            with lock:
                events.append((ids[id(batch)], index, state.value, when))

        executor.on_start.append(note)
        executor.on_end.append(note)

        def flush() -> None:
            with lock:
                batch_events, events[:] = list(events), []
            for i in range(0, len(batch_events), REPORT_EVENTS):
                chunk = batch_events[i : i + REPORT_EVENTS]
                with contextlib.suppress(OSError):  # the worker is gone: no one to tell
                    sock.sendall(pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))

        stopping = threading.Event()

        def report() -> None:
            while not stopping.wait(TICK):
                flush()

        threading.Thread(target=report, daemon=True).start()
        timeout = ORPHAN_TIMEOUT
        while True:
            try:
                data = sock.recv(MESSAGE_LIMIT)
            except OSError:
                data = b""
            if not data:
                break  # the worker is gone: finish up
            message = pickle.loads(data)
            if message[0] == "drain":
                timeout = message[1]
                break
            _, bid, origin, request_id, calls = message
            batch = Batch(
                origin,
                request_id,
                [Call(f, a, k, context=tracing.context_from(tp)) for f, a, k, tp in calls],
            )
            batch.on_done = lambda *_, b=batch: note(b)
            ids[id(batch)] = bid
            executor.submit(batch)
        executor.drain(timeout)
        tracing.flush()  # os._exit below runs no exit hook: the spans go now
        stopping.set()
        flush()
        with contextlib.suppress(OSError):
            sock.sendall(pickle.dumps("drained"))
    except BaseException:
        log.exception("deferred helper process failed")
        code = 1
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stderr.flush()
        os._exit(code)


def _close_sockets(keep: int) -> None:
    """Close the sockets inherited from the worker (its listening socket, web server
    connections, the app's own connections): a connection the worker closes must
    really close, and a connection shared by two processes corrupts its stream."""
    import stat

    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd == keep:
            continue
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
        except OSError:
            continue
        if fd == 0:  # supervisord's listening socket: keep fd 0 open, on /dev/null
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
        else:
            os.close(fd)
