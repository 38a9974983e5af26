"""The worker process: an I/O loop in front of a request runner, and its lifecycle.

Why not flup's model: flup gives each connection a blocking thread that
``select``s before every record and sends END_REQUEST only after the app's
``close()``. nginx keeps many idle upstream connections open, each of which
would hold a thread, and the connection could not be reused until all the
post-response work was over (php-src issue 10335 in another guise). Here one
thread watches every socket with epoll (``loop.IOLoop``), parses what arrives
(``wire.connection``), and hands only complete requests to the runner;
``finish_request`` gives the connection straight back to the loop.

Signal handlers only set a flag, wake the loop, and queue what needs a thread (a
reload's check, a stop's deadline) for the signal thread: a handler runs between two
bytecodes of whatever the main thread was doing, which may hold the very locks
starting a thread takes. Nothing stops by an exception.
"""

from __future__ import annotations

import functools
import gc
import ipaddress
import logging
import os
import queue
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import affinity
from .io.channel import Channel
from .io.listener import Listener
from .io.loop import IOLoop
from .ops.accesslog import AccessLog, log_access
from .ops.answers import Answers
from .ops.watchdog import Watchdog
from .options import Options
from .reload import Handover, check_app, hold_signals, release_signals
from .wire import connection as wire
from .wire.connection import IncomingRequest
from .wsgi.files import FileWrapper
from .wsgi.request import BAD_REQUEST, Request
from .wsgi.runners import InlineRunner, ThreadRunner
from .wsgi.running import Running
from .wsgi.streams import ErrorStream, RequestBody

log = logging.getLogger("fcgi")

# Exit codes: graceful stop with everything done, and with work left unrun.
EXIT_OK = 0
EXIT_ABANDONED = 3

# Carries the request count across an in-place restart, so ids (pid-seq) never repeat.
SEQ_ENV = "FCGI_REQUEST_SEQ"

DrainHook = Callable[[float], int]


def _seq_base() -> int:
    text = os.environ.pop(SEQ_ENV, "")
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else 0


class Server:
    """Accepts web server connections, parses requests, and runs them through the app."""

    def __init__(
        self,
        app: Callable[..., Any],
        options: Options,
        listener: Listener,
        reloaded: Handover | None = None,
    ) -> None:
        self.app = app
        self.options = options
        self.listener = listener
        self.drain_hooks: list[DrainHook] = []
        self.stats_hooks: list[Callable[[], dict[str, Any]]] = []
        self.pid = os.getpid()
        self.folder = os.getcwd()  # the app's, --chdir applied (the app may chdir later)
        self.seq_base = _seq_base()
        self.access_log = (
            AccessLog(options.access_log, options.access_log_format, self.pid)
            if options.access_log
            else None
        )
        self.stopping = False
        self.requests = 0
        self.recycle_after = options.max_requests and options.max_requests + random.randint(
            0, options.max_requests_jitter
        )
        # A reload (SIGHUP, SIGUSR2, --max-requests) drains, then cli.main exec()s a fresh
        # interpreter in this process with the listening socket and the idle kept-alive
        # connections (fcgi.reload): supervisord sees no exit, nginx no close.
        self.reloading = False
        self._terminated = False  # TERM or INT: a stop that no reload may turn into one
        self._exec_thread: int | None = None  # the thread that execs a reload, once it has begun
        self._checking = False  # the new code is being imported in a child process
        self._check_again = False  # a reload was asked for during that check
        self.handover: Handover | None = None  # what the next interpreter adopts
        # every request handed to the runner -> the id of the thread running it (0: queued)
        self.in_progress = Running()
        self._overdue: threading.Timer | None = None  # bounds a real stop, once begun
        self._draining: DrainHook | None = None  # the drain hook running, for that bound's log
        self.watchdog = (
            Watchdog(
                self.in_progress.snapshot,
                options.slow_request,
                options.request_timeout,
                self._time_out,
            )
            if options.slow_request or options.request_timeout
            else None
        )
        # status page, ping, outside --mount; after a reload (what the previous interpreter
        # of this process handed over) the pool's figures go on
        kept = None if reloaded is None else reloaded.scoreboard
        self.answers = Answers(options, self._counters, listener.sock, kept)
        self.scoreboard = self.answers.scoreboard
        # FCGI_GET_VALUES answers: several requests per connection (HAProxy's
        # mpxs-conns), as many connections as --max-connections, and as many requests as
        # run at once: --threads, plus those gone on after an early finish.
        self.fcgi_values = {
            "FCGI_MAX_CONNS": str(options.max_connections),
            "FCGI_MAX_REQS": str(options.threads + options.max_detached),
            "FCGI_MPXS_CONNS": "1",
        }
        self.loop = IOLoop(listener, options, self._on_request, self._on_body, self.fcgi_values)
        self.loop.count_waits = self.scoreboard is not None and options.threads == 1
        if options.threads == 1:
            self.runner: InlineRunner | ThreadRunner = InlineRunner(
                self.handle, options.max_detached, self.hand_over_loop
            )
        else:
            self.runner = ThreadRunner(self.handle, options.max_detached, options.threads)
        self.base_environ: dict[str, Any] = {
            "wsgi.version": (1, 0),
            "wsgi.errors": ErrorStream(),
            # Requests that finish early go on beside the others, even with --threads 1.
            "wsgi.multithread": options.threads > 1 or options.max_detached > 0,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
            "fcgi.add_drain_hook": self.add_drain_hook,
            "fcgi.add_stats_hook": self.add_stats_hook,
            # the CPUs this worker was allowed before --cpu-affinity bound it to one:
            # for what deferred work starts (a helper process, a command)
            "fcgi.cpus": tuple(affinity.allowed()),
            "fcgi.deferred_limits": {
                "slow": options.slow_deferred or None,
                "timeout": options.deferred_timeout or None,
            },
            # which app this is (MODULE:CALLABLE, and the folder it runs in): a journal's
            # calls belong to it, and only its workers take them over
            "fcgi.app": {"spec": options.app, "folder": self.folder},
        }
        # the loop's batch in which a request last ran inline, and its connection
        self._inline_last: tuple[int, Channel | None] = (-1, None)
        self.exit_code = EXIT_OK
        self._alarm_told = False  # a stray SIGALRM was logged (handle_alarm)
        self._owner: object = None  # the token of the thread running the loop
        self._deadline: float | None = None  # of the graceful stop, once begun
        self._reexec: Callable[[Handover], None] | None = None
        self.stopped = threading.Event()  # the stop (or a reload's drain) is over
        # what the signal handlers leave for the signal thread: (what, why)
        self._signaled: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    @property
    def conns(self) -> dict[int, Channel]:
        """The open connections by fd (the loop's; read them, never change them)."""
        return self.loop.conns

    # -- lifecycle ---------------------------------------------------------------

    def install_signals(self) -> None:
        threading.Thread(target=self._act_on_signals, name="fcgi-signals", daemon=True).start()
        signal.signal(signal.SIGTERM, self.handle_term)
        signal.signal(signal.SIGINT, self.handle_term)
        signal.signal(signal.SIGQUIT, self.handle_quit)
        signal.signal(signal.SIGUSR1, self.handle_usr1)
        signal.signal(signal.SIGHUP, self.handle_reload)
        signal.signal(signal.SIGUSR2, self.handle_reload)
        # An app may time itself with signal.alarm(); a SIGALRM it did not set a handler
        # for would end the worker (the default action) with every request on it.
        if signal.getsignal(signal.SIGALRM) is signal.SIG_DFL:
            signal.signal(signal.SIGALRM, self.handle_alarm)

    def _signals_heard(self) -> None:
        """Before a reload's exec: hold the signals the next interpreter takes over, and
        wait until the signal thread has acted on (logged) every one that came before;
        from here, one that comes is kept for the next interpreter (``_for_next``)."""
        hold_signals()
        self._exec_thread = threading.get_ident()
        heard = threading.Event()
        self._signaled.put(("heard", heard))
        heard.wait(1.0)
        if self._terminated:  # a TERM since the reload was decided: the next one stops
            signal.pthread_kill(self._exec_thread, signal.SIGTERM)

    def _act_on_signals(self) -> None:
        """The signal thread: what the handlers asked for that takes a thread or a lock."""
        while True:
            what, why = self._signaled.get()
            if what == "heard":
                why.set()
            elif what == "reload":
                self.reload(why)
            elif what == "term" and self._overdue is None:
                # the graceful stop runs on the loop's thread: a request stuck on that
                # thread (--threads 1) would hold it for ever, so a timer bounds the stop
                limit = self.options.graceful_timeout + 2.0
                self._overdue = threading.Timer(limit, self._stop_overdue)
                self._overdue.daemon = True
                self._overdue.start()
            elif what == "alarm" and not self._alarm_told:
                self._alarm_told = True
                log.warning(
                    "SIGALRM ignored: the app set no handler for it (signal.alarm() without "
                    "signal.signal()?), and its default would end the worker; later ones "
                    "are ignored without a word"
                )

    def _for_next(self, signum: int) -> bool:
        """True if a reload's exec is under way: the signal is made pending on the thread
        that execs, which holds it, so it outlives the exec and reaches the next
        interpreter's handlers (other threads may take it, and would drop it with the
        process image)."""
        thread = self._exec_thread
        if thread is None:
            return False
        signal.pthread_kill(thread, signum)
        return True

    def handle_alarm(self, signum: int, frame: Any) -> None:
        if self._for_next(signum):
            return
        self._signaled.put(("alarm", ""))  # SimpleQueue.put: safe in a signal handler

    def handle_reload(self, signum: int, frame: Any) -> None:
        if self._for_next(signum):
            return
        self._signaled.put(("reload", signal.Signals(signum).name))

    def reload(self, why: str) -> None:
        """Reload in place once the new code is known to import (the check runs in a
        thread of its own); from any thread but a signal handler (``handle_reload``)."""
        # A reload asked for while one is under way is answered by it: a new attempt on
        # the record, which that reload's outcome then closes (``fcgi-finish reload``
        # waits for an outcome of an attempt it began).
        if self.stopping:
            if self.reloading:
                self._record_reload("checking")
            log.info("%s: a reload or stop is already under way", why)
            return
        if self._checking:  # the check may have read the code before this change
            self._record_reload("checking")
            self._check_again = True
            log.info("%s: the new code is checked again once the check under way ends", why)
            return
        self._checking = True
        threading.Thread(
            target=self._check_then_reload, args=(why,), name="fcgi-reload", daemon=True
        ).start()

    def _check_then_reload(self, why: str) -> None:
        options = self.options
        # here, not in reload(): from a signal handler, the scoreboard's lock may be held by
        # the very code the signal interrupted (a request ending on the main thread)
        self._record_reload("checking")
        log.info("%s: reloading; importing %s in a child process first", why, options.app)
        affinity.unbind_thread()  # the import check has a GIL of its own: every CPU
        check = functools.partial(
            check_app,
            options.app,
            options.pythonpath,
            options.reload_check_path,
            folder=self.folder,
        )
        try:
            failure = check()
            while self._check_again and failure is None:
                self._check_again = False
                failure = check()
        finally:
            self._checking = self._check_again = False
        if failure is not None:
            log.error("%s: the new code is refused; the old code keeps serving:\n%s", why, failure)
            self._record_reload("refused", failure)
            return
        if not self.stopping:
            self.reloading = True
            if self._terminated:  # a TERM between the line above and the one before
                self.reloading = False
            else:
                self.stop()

    def _record_reload(self, state: str, detail: str = "") -> None:
        """The reload's outcome, where ``fcgi-finish reload`` reads it (the scoreboard)."""
        if self.scoreboard is not None:
            try:
                self.scoreboard.reload_outcome(state, detail)
            except OSError as exc:
                log.warning("cannot record the reload's outcome: %s", exc)

    def reloaded(self) -> None:
        """This interpreter is a reload's, serving the new code."""
        log.info("reloaded: serving the new code")
        self._record_reload("reloaded")

    def handle_usr1(self, signum: int, frame: Any) -> None:
        if self._for_next(signum):
            return
        if self.access_log is not None:
            self.access_log.reopen()

    def handle_term(self, signum: int, frame: Any) -> None:
        if self._for_next(signum):
            return
        self._terminated = True
        self.reloading = False  # a real stop wins over a reload under way
        self._signaled.put(("term", ""))  # the signal thread bounds the stop
        self.stop()

    def _stop_overdue(self) -> None:
        if self.stopped.is_set():
            return
        running = list(self.in_progress.snapshot())
        for request in running:
            log.error("%s still running at the graceful deadline; abandoned", request)
        log.error(
            "not stopped %.0f s after the stop began: %s; exiting %d",
            self.options.graceful_timeout + 2.0,
            self._holding(running),
            EXIT_ABANDONED,
        )
        totals = self._totals_now()
        if totals:
            log.error("deferred work at the hard exit: %s", totals)
        logging.shutdown()
        os._exit(EXIT_ABANDONED)

    def _holding(self, running: list[Request]) -> str:
        """What keeps the stop from its end, for the overdue line."""
        hook = self._draining
        if hook is not None:
            name = getattr(hook, "__qualname__", None) or repr(hook)
            return f"the drain hook {name} (deferred work's stop) has not returned"
        if running and self.options.threads == 1:
            return f"the loop's thread is held by {running[0]} (--threads 1)"
        if running:
            return f"{len(running)} request(s) still running"
        return "the loop's thread has not finished the stop (no request is running)"

    def _totals_now(self) -> str:
        """The deferred-work counters of the stats hooks that answer within a second (one
        may be stuck behind what holds the stop)."""
        answers: list[dict[str, Any]] = []
        hooks = list(self.stats_hooks)
        reader = threading.Thread(target=lambda: answers.extend(h() for h in hooks), daemon=True)
        reader.start()
        reader.join(1.0)
        counts: dict[str, Any] = {}
        for answer in list(answers):
            for key, value in answer.items():
                counts[key] = counts.get(key, 0) + value
        shown = ("registered", "done", "failed", "abandoned", "queued", "running")
        totals = ", ".join(f"{key} {counts[key]}" for key in shown if key in counts)
        if counts.get("journal_pending"):  # abandoned here, not lost: the journal keeps them
            totals += f"; {counts['journal_pending']} pending in the journal for the next worker"
        return totals

    def handle_quit(self, signum: int, frame: Any) -> None:
        log.warning("SIGQUIT: stopping at once, dropping running requests and deferred work")
        self.listener.close()
        os._exit(1)

    def stop(self) -> None:
        """Begin a graceful stop; safe from a signal handler or another thread: it sets a
        flag and wakes the loop."""
        self.stopping = True
        self.loop.wake()

    def serve(self, reexec: Callable[[Handover], None] | None = None) -> int:
        """Serve until ``stop()``, then stop gracefully; returns the exit code. A reload
        ends in ``reexec(handover)`` (which does not return: ``reload.exec_in_place``),
        called by the thread that finished the drain; without it, ``handover`` is left
        for the caller."""
        # The app is loaded: what it made at import lives as long as the worker, so the
        # collector stops scanning it (a full collection over a Django app's objects
        # takes milliseconds, a request's own garbage is young).
        gc.collect()
        gc.freeze()
        self._offer_extensions()
        self.runner.start()
        if self.watchdog is not None:
            self.watchdog.start()
        self.answers.start()
        if self.listener.sock.family != socket.AF_UNIX and not self.options.allow:
            host = self.listener.sock.getsockname()[0]
            if not ipaddress.ip_address(host).is_loopback:
                log.warning(
                    "listening on %s with no allow-list: anyone who can reach it can "
                    "send requests; set --allow or FCGI_WEB_SERVER_ADDRS",
                    host,
                )
        self.loop.start_accepting()
        log.info(
            "serving on %s with %d thread(s), pid %d%s",
            self.listener.describe(),
            self.options.threads,
            os.getpid(),
            "" if wire.__file__.endswith(".py") else "; wire core compiled (mypyc)",
        )
        self._reexec = reexec
        self._owner = token = object()
        self._run_loop(token)
        self.stopped.wait()  # the loop may have moved to another thread meanwhile
        return self.exit_code

    def _offer_extensions(self) -> None:
        """Offer the app, before any request, the ``fcgi.*`` keys every request's environ
        carries: an app object with an ``fcgi_startup(extensions)`` method (the
        deferred-work middleware has one) takes its hooks now, so a worker that has
        served nothing yet (just reloaded, no traffic) still drains its deferred work at
        a stop and shows it on the status page. Apps without it get them per request."""
        startup = getattr(self.app, "fcgi_startup", None)
        if not callable(startup):
            return
        extensions = {k: v for k, v in self.base_environ.items() if k.startswith("fcgi.")}
        try:
            startup(extensions)
        except Exception:  # the app's problem: the hooks still come with each request
            log.exception("the app's fcgi_startup() failed")

    def hand_over_loop(self, thread: int) -> bool:
        """Move the I/O loop off ``thread``, which runs it now, to a new thread, so that one
        can go on with its request (detached, or given up on); False if ``thread`` does
        not run the loop. Called by that thread itself or, under the inline runner's
        lock, by one that waited long enough for it.

        The old owner leaves the rest of its event batch: epoll is level-triggered,
        so whatever it did not read is reported again to the new owner; while stopping,
        the new owner goes on with the drain (``_graceful_stop``).
        """
        if self.loop.owner != thread:
            return False
        self._owner = token = object()
        self.loop.owner = None
        threading.Thread(
            target=self._run_loop, args=(token,), name="fcgi-loop", daemon=True
        ).start()
        return True

    def _run_loop(self, token: object) -> None:
        def still_owner() -> bool:
            return self._owner is token

        try:
            while not self.stopping:
                if not self.loop.poll(-1, still_owner):
                    return  # another thread owns the loop now
            code = self._graceful_stop(still_owner)
            if code is None:
                return  # the loop moved midway: the new owner goes on with the drain
            self.exit_code = code
        except BaseException:  # a fault of the worker itself: app faults never get here
            if self._owner is token:
                log.exception("the I/O loop failed; stopping")
                self.exit_code = 1
            else:  # a request given up on, ending after the worker went on without it
                log.exception("a request's thread failed after the loop left it")
        finally:
            if self._owner is token:
                # a stop begun as a stop closed the socket: it never hands it over
                if self.reloading and not self._terminated and self.exit_code != 1:
                    kept = self.loop.keep_idle()
                    listener = self.listener
                    self.handover = Handover(
                        listener.sock.detach(), listener.path, kept, self.answers.kept_folder
                    )
                else:
                    self.listener.close()
                if self.watchdog is not None:
                    self.watchdog.stop()
                self.answers.close(reloading=self.handover is not None)
                if self.access_log is not None:
                    self.access_log.close()
                self.loop.shutdown()
                if self.handover is not None:
                    os.environ[SEQ_ENV] = str(self.seq_base + self.requests)
                try:
                    # from this thread, whichever it is: the main one may be held by a
                    # request given up on (--threads 1), so it cannot be waited for
                    if self.handover is not None and self._reexec is not None:
                        self._signals_heard()
                        self._reexec(self.handover)  # does not return but by raising
                except OSError:
                    self._exec_thread = None  # what was held is this interpreter's again
                    release_signals()
                    log.exception("the reload's exec failed; stopping")
                    self.exit_code = 1
                finally:
                    self.stopped.set()

    def _graceful_stop(self, still_owner: Callable[[], bool]) -> int | None:
        """Drain, then stop the runner and run the drain hooks; the exit code, or None if
        the loop moved to another thread meanwhile (a request on the inline runner took
        it, or was given up on), which then goes on from where this one was."""
        loop = self.loop
        if self._deadline is None:
            self._deadline = time.monotonic() + self.options.graceful_timeout
            log.info(
                "%s: finishing running requests and deferred work (up to %.0f s)",
                "reloading" if self.reloading else "stopping",
                self.options.graceful_timeout,
            )
            loop.stop_accepting()
            if not self.reloading:  # a reloading worker keeps its socket for its next life
                self.listener.close()
                loop.close_after_responses()
        deadline = self._deadline
        # Requests still arriving on open connections are read to the end and run; the
        # loop goes on flushing output until every request has ended. Reloading, the
        # connections with no request are parked (no longer read: what comes waits in the
        # kernel for the next interpreter); stopping, they are closed.
        if not loop.poll(0, still_owner):
            return None
        told: set[Channel] = set()  # those named in the log as half-sent
        while time.monotonic() < deadline:
            if self.reloading:
                arriving = loop.park_idle()
            else:
                loop.close_after_responses()  # after a SIGTERM during a reload's drain
                arriving = loop.close_idle(time.monotonic())
            if arriving:
                self._tell_half_sent(told, deadline)
            if not arriving and not self.in_progress and not loop.has_output():
                break
            if not loop.poll(0.02, still_owner):
                return None
        abandoned = 0
        if not self.runner.stop(deadline):
            for request in self.in_progress.snapshot():
                log.error("%s still running at the graceful deadline; abandoned", request)
                abandoned += 1
        if not self.reloading:  # a reload's exec is what ends their threads
            for request in self.in_progress.given_up():
                log.error(
                    "%s timed out (--request-timeout) and still runs in the app at the "
                    "stop; abandoned",
                    request,
                )
                abandoned += 1
        for hook in self.drain_hooks:
            self._draining = hook
            try:
                abandoned += hook(max(0.0, deadline - time.monotonic()))
            except Exception:
                log.exception("drain hook %r failed", hook)
            finally:
                self._draining = None
        if self.reloading:
            log.info("drained after %d request(s); reloading", self.requests)
        else:
            log.info("stopped after %d request(s)", self.requests)
        return EXIT_ABANDONED if abandoned else EXIT_OK

    def _tell_half_sent(self, told: set[Channel], deadline: float) -> None:
        """Name each connection whose request is half-sent, once: the stop waits for the
        rest of it until --read-timeout closes it or the deadline, whichever comes first."""
        now = time.monotonic()
        for conn in self.conns.values():
            since = conn.receiving_since
            if since is None or conn in told:
                continue
            told.add(conn)
            timed_out = since + self.options.read_timeout
            until, limit = (
                (timed_out, "--read-timeout")
                if timed_out < deadline
                else (deadline, "the deadline")
            )
            log.warning(
                "connection %d: a request is half-sent; the %s waits for the rest of it up "
                "to %.1f s more (%s)",
                conn.fd,
                "reload" if self.reloading else "stop",
                max(0.0, until - now),
                limit,
            )

    # -- on the loop's thread ------------------------------------------------------

    def _on_request(self, conn: Channel, incoming: IncomingRequest) -> None:
        request = Request(conn, incoming)
        self.requests += 1
        request.request_id = f"{self.pid}-{self.seq_base + self.requests}"
        # whether it waited for a thread: all --threads taken; with one, inline, whether
        # the loop's thread was running another connection's request when it came: the
        # loop has found events waiting at every poll since it ran that one
        if self.options.threads == 1:
            loop, (ran, ran_conn) = self.loop, self._inline_last
            request.waited = ran_conn is not conn and loop.last_blocked <= ran
            self._inline_last = (loop.batch, conn)
        else:
            busy = len(self.in_progress) - self.runner.detached
            request.waited = busy >= self.options.threads
        self.in_progress.queued(request)
        if self.requests == self.recycle_after:
            self.reload(f"recycling after {self.requests} requests")
        self.runner.submit(request)

    def _on_body(self, incoming: IncomingRequest, data: bytes) -> None:
        body = incoming.body
        if body is None:
            body = incoming.body = RequestBody(self.options.spool_threshold)
        body.add(data)

    # -- hooks offered to apps through the environ -----------------------------------

    def add_stats_hook(self, hook: Callable[[], dict[str, Any]]) -> None:
        """Offered as ``environ["fcgi.add_stats_hook"]``: ``hook()`` returns deferred-work
        counters (queued, running, done, failed, abandoned) for the status page."""
        if hook not in self.stats_hooks:
            self.stats_hooks.append(hook)

    def add_drain_hook(self, hook: DrainHook) -> None:
        """Offered to apps as ``environ["fcgi.add_drain_hook"]``: ``hook(seconds_left)`` runs
        at graceful stop and returns how many pieces of work it had to abandon."""
        if hook not in self.drain_hooks:
            self.drain_hooks.append(hook)

    def _counters(self) -> tuple[int, dict[str, Any]]:
        deferred: dict[str, Any] = {}
        for hook in self.stats_hooks:
            for key, value in hook().items():
                old = deferred.get(key, 0)  # a maximum for the last duration, else a sum
                deferred[key] = max(old, value) if key == "last_duration" else old + value
        return (self.watchdog.slow if self.watchdog else 0), deferred

    def _time_out(self, request: Request, running_for: float, thread: int, stack: str) -> None:
        """From the watchdog: ``request`` ran past --request-timeout. Its response is ended
        (504, or a cut), its thread abandoned (Python cannot end a thread), and the worker
        reloads in place once the others have drained: the exec ends that thread, as
        uWSGI's harakiri recycles a worker."""
        if not self.in_progress.give_up(request):
            return
        outcome = request.time_out()
        if outcome is None or not request.thread:
            return  # it ended on its own meanwhile
        # counted and told before it is abandoned: that may move the loop, whose new owner
        # may finish a drain under way and exec at once
        if self.scoreboard is not None:
            self.scoreboard.timed_out()
        if self.stopping and not self.reloading:
            then = "the stop goes on without it (the exit abandons its thread)"
        elif self.stopping or self._checking:
            then = "the reload under way ends its thread"
        else:
            then = "the worker reloads in place once the others have drained"
        log.error(
            "request timed out: %s running for %.1f s (--request-timeout %g), thread %d; "
            "%s; %s:\n%s",
            request,
            running_for,
            self.options.request_timeout,
            thread,
            outcome,
            then,
            stack,
        )
        self.runner.abandon(request)
        if not (self.stopping or self._checking):  # else one is under way already
            self.reload(f"{request} ran past --request-timeout")

    # -- running a request, on a runner thread ------------------------------------

    def handle(self, request: Request) -> None:
        request.started = time.monotonic()
        request.thread = thread = threading.get_ident()
        self.in_progress.started(request, thread)
        environ = request.build_environ(self.base_environ, self.options.mount)
        if self.access_log is not None:
            environ["fcgi.log_fields"] = {}
            environ["fcgi.log_deferred"] = functools.partial(
                self.access_log.deferred, request.request_id
            )
            request.on_finish = log_access(self.access_log)
        board = self.scoreboard
        if board is not None:
            length = request.incoming.content_length
            board.request_started(
                environ["REQUEST_METHOD"],
                environ.get("REQUEST_URI", ""),
                "" if length is None else str(length),
                request.waited,
            )
        try:
            if request.error is not None:
                log.warning("%s: %s; answered 400", request, request.error)
                request.answer(BAD_REQUEST)
                return
            answer = self.answers.find(request) if self.answers.active else None
            if answer is not None:
                request.call_app(lambda environ, start_response: answer(request) or [])
            else:
                request.call_app(self.app)
        finally:
            if request.incoming.body is not None:
                request.incoming.body.close()
            self.in_progress.ended(request)  # (given up on already, past --request-timeout)
            request.thread = 0  # ended: no longer the loop's to move (runners.InlineRunner)
            if board is not None:
                board.request_ended()
            if request.dropped:
                log.debug(
                    "%s: %d byte(s) written after finish_request dropped", request, request.dropped
                )
