"""``make bench``: each performance goal measured against a baseline in the same run.

Every comparison runs as alternating rounds (A, B, A, B, ...) so a noisy,
shared machine slows both sides alike; goals are ratios, never absolute
numbers. Writes var/bench/report.md and var/bench/bench.png and prints the
goals with PASS/FAIL. BENCH_SECONDS (5) and BENCH_ROUNDS (3) set the length.
Hello world runs against Granian (Rust), uWSGI (C), gunicorn sync, PHP-FPM and flup
side by side; a Flask page against the first three.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.benchmarks import harness
from tests.benchmarks.harness import Run, probe, rss_kb, summary, wrk
from tests.procs import ROOT, nginx, python_env, stack, wait_for, worker
from wsgi_app.journal import Journal

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
OUT = ROOT / "var" / "bench"
APPS = "tests.benchmarks.apps"
SCRIPTS = Path(__file__).parent

goals: list[tuple[str, str, str, bool]] = []
sections: list[str] = []
chart: dict[str, dict[str, tuple[float, float, float]]] = {}


def alternate(targets: dict[str, Callable[[], Run]]) -> dict[str, list[Run]]:
    """Run each target once per round, in turn, after one untimed warm-up each."""
    for measure in targets.values():
        measure()
    results: dict[str, list[Run]] = {name: [] for name in targets}
    for _ in range(ROUNDS):
        for name, measure in targets.items():
            results[name].append(measure())
    return results


def table(title: str, results: dict[str, list[Run]], field: str, unit: str) -> None:
    rows = [
        f"### {title}",
        "",
        f"| server | median {unit} | min-max | errors |",
        "|---|---|---|---|",
    ]
    for name, runs in results.items():
        med, low, high = summary([getattr(r, field) for r in runs])
        rows.append(
            f"| {name} | {med:,.1f} | {low:,.1f}-{high:,.1f} | {sum(r.errors for r in runs)} |"
        )
    sections.append("\n".join(rows) + "\n")


def goal(name: str, ratio: float, target: str, ok: bool, note: str = "") -> None:
    goals.append((name, f"{ratio:.2f}x" + (f" ({note})" if note else ""), target, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {ratio:.2f}x (goal {target}) {note}", flush=True)


def med(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data


def url(port: int, path: str = "/") -> str:
    return f"http://127.0.0.1:{port}{path}"


def ours(
    stack_: contextlib.ExitStack,
    tmp: Path,
    app: str,
    *args: str,
    core: Path | None = None,
    **env: str,
) -> tuple[int, int]:
    """Our worker with default options (and ``env``) behind the shipped nginx.conf:
    (port, pid). ``core``: a folder whose ``fcgi`` package the worker runs instead of
    the checkout's (``cores``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    environ = python_env(**env)
    if core is not None:
        environ["PYTHONPATH"] = f"{core}{os.pathsep}{ROOT}"
    proc, sock = stack_.enter_context(
        worker(tmp, app, "--log-level", "warning", *args, env=environ, cwd=core or ROOT)
    )
    return stack_.enter_context(nginx(tmp, sock)), proc.pid


@functools.cache
def cores() -> dict[str, Path]:
    """The worker's package twice, side by side for one run: pure Python, and with the
    wire core compiled by mypyc (setup.py's optional build), each a copy under var/bench
    (made once per run; whatever ``make compiled`` left in the checkout is not copied)."""
    made = {}
    for name, compile_ in (("pure", False), ("compiled", True)):
        folder = OUT / "cores" / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(ROOT / "fcgi", folder / "fcgi", ignore=shutil.ignore_patterns("*.so"))
        if compile_:
            shutil.copy(ROOT / "setup.py", folder)
            subprocess.run(
                [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                cwd=folder,
                env=dict(os.environ, FCGI_FINISH_COMPILE="1"),
                check=True,
                capture_output=True,
            )
        where = subprocess.run(
            [sys.executable, "-c", "import fcgi.wire.connection as c; print(c.__file__)"],
            cwd=folder,
            env=dict(python_env(), PYTHONPATH=f"{folder}{os.pathsep}{ROOT}"),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        if where.strip().endswith(".py") == compile_:
            raise RuntimeError(f"the {name} core imports {where.strip()}")
        made[name] = folder
    return made


def python_servers(es: contextlib.ExitStack, tmp: Path, app: str) -> dict[str, str]:
    """Ours (pure Python, and with the optional compiled wire core) and the Python
    servers users pick, each one process behind the same nginx, serving ``app``:
    name -> URL."""
    port, _ = ours(es, tmp / "ours", app, core=cores()["pure"])
    cport, _ = ours(es, tmp / "compiled", app, core=cores()["compiled"])
    gport, _ = es.enter_context(harness.granian_behind_nginx(tmp / "granian", app))
    usock = es.enter_context(harness.uwsgi_server(tmp / "uwsgi", app))
    uport = es.enter_context(nginx(tmp / "uwsgi", usock))
    hport, _ = es.enter_context(harness.gunicorn_behind_nginx(tmp / "gunicorn", app))
    return {
        "fcgi-finish": url(port),
        "fcgi-finish compiled": url(cport),
        "Granian": url(gport),
        "uWSGI": url(uport),
        "gunicorn sync": url(hport),
    }


def served(urls: dict[str, str], tmp: Path, what: str) -> dict[str, list[Run]]:
    """Alternating wrk rounds against each of ``urls``; a server failing its requests
    answers fast, so it is no baseline: that stops the run."""
    res = alternate({name: functools.partial(wrk, u, SECONDS) for name, u in urls.items()})
    for name, runs in res.items():
        errors = sum(r.errors for r in runs)
        if errors > len(runs) * 10:
            raise RuntimeError(
                f"{name} answered {errors:,} {what} requests with errors, so its req/s "
                f"mean nothing; its log is under {tmp}"
            )
    return res


def hello_world(tmp: Path) -> None:
    with contextlib.ExitStack() as es:
        urls = python_servers(es, tmp, f"{APPS}:hello")
        fsock = es.enter_context(harness.flup_server(tmp / "flup", f"{APPS}:hello"))
        psock, script = es.enter_context(harness.php_fpm(tmp / "php"))
        urls["PHP-FPM"] = url(
            es.enter_context(nginx(tmp / "php", psock, harness.php_nginx_edit(script)))
        )
        urls["flup WSGIServer"] = url(es.enter_context(nginx(tmp / "flup", fsock)))
        res = served(urls, tmp, "hello-world")
    table("1. Hello world, one process, the same nginx (req/s)", res, "rps", "req/s")
    chart["hello world req/s"] = {
        name: summary([r.rps for r in runs]) for name, runs in res.items()
    }
    ours_rps = med(res["fcgi-finish"], "rps")
    for name, target in (("Granian", 1.0), ("uWSGI", 1.0), ("gunicorn sync", 5.0)):
        ratio = ours_rps / med(res[name], "rps")
        goal(f"1. hello world vs {name}", ratio, f">= {target:.1f}x", ratio >= target)
    ratio = med(res["fcgi-finish compiled"], "rps") / med(res["Granian"], "rps")
    goal("1. hello world, compiled wire core, vs Granian", ratio, ">= 1.0x", ratio >= 1.0)
    compiled = med(res["fcgi-finish compiled"], "rps") / ours_rps
    php = ours_rps / med(res["PHP-FPM"], "rps")
    flup = ours_rps / med(res["flup WSGIServer"], "rps")
    sections.append(
        f"fcgi-finish is {php:.2f}x PHP-FPM (one child, the same hello world in PHP) "
        f"and {flup:.2f}x flup's WSGIServer; the compiled wire core (make compiled) is "
        f"{compiled:.2f}x the pure Python one. Granian and gunicorn are proxied over HTTP/1.1 "
        "with kept-alive upstream connections, uWSGI and ours over FastCGI (keep-conn).\n"
    )


def flask_page(tmp: Path) -> None:
    """A real page (Flask, a Jinja template of 20 rows) on the same servers."""
    with contextlib.ExitStack() as es:
        res = served(python_servers(es, tmp, f"{APPS}:flask_page"), tmp, "Flask page")
    table("1b. Flask + Jinja page, one process, the same nginx (req/s)", res, "rps", "req/s")
    for side in ("fcgi-finish", "fcgi-finish compiled"):
        ours_rps = med(res[side], "rps")
        for name in ("Granian", "uWSGI", "gunicorn sync"):
            ratio = ours_rps / med(res[name], "rps")
            goal(f"1b. Flask page, {side}, vs {name}", ratio, ">= 1.0x", ratio >= 1.0)


def scaling(tmp: Path) -> None:
    """1, 2, ... N workers (N: the CPUs) of hello world in one pool under the shipped
    supervisord and nginx; the workers beyond n are stopped with supervisorctl. wrk
    runs a thread per worker (up to the CPUs) and 16 connections per worker."""
    cores = os.cpu_count() or 1
    sizes = range(1, cores + 1)
    app = (f"APP={APPS}:hello", f"FCGI_CHDIR={ROOT}")
    with stack(tmp, cores, *app) as (port, ctl):

        def pool_of(n: int) -> Run:
            for i in range(cores):
                ctl("start" if i < n else "stop", f"app:app_{i:02d}")
            return wrk(url(port), SECONDS, 16 * n, threads=min(n, cores))

        res = alternate(
            {f"{n} worker{'s' if n > 1 else ''}": functools.partial(pool_of, n) for n in sizes}
        )
    one = med(res["1 worker"], "rps")
    rows = [
        "### 2. Scaling: n workers of one pool, the shipped supervisord and nginx, hello world",
        "",
        "| workers | median req/s | req/s per worker | ratio to one worker |",
        "|---|---|---|---|",
    ]
    for n, runs in zip(sizes, res.values(), strict=True):
        rps = med(runs, "rps")
        rows.append(f"| {n} | {rps:,.0f} | {rps / n:,.0f} | {rps / one:.2f} |")
    sections.append(
        "\n".join(rows)
        + f"\n\n{cores} cores, shared with nginx and wrk: the goal (>= 0.9 n) needs free "
        "cores beside the workers'.\n"
    )
    ratio = med(res[f"{cores} worker{'s' if cores > 1 else ''}"], "rps") / one
    goal(
        f"2. {cores} workers vs one",
        ratio,
        f">= {0.9 * cores:.1f}x where cores are free",
        ratio >= 0.9 * cores,
        f"{cores} cores shared with nginx and wrk",
    )


def cpu_affinity(tmp: Path) -> None:
    """--cpu-affinity auto (the default) against off: two workers of the capacity app,
    the same hash seed, alternating rounds of plain hello world and of the mix where
    one request in twenty defers 0.1 s (where binding matters: the GIL's hand-overs)."""
    script = str(SCRIPTS / "one_in_twenty.lua")
    with contextlib.ExitStack() as es:
        app = "tests.benchmarks.apps_capacity:plain"
        sides = {
            name: ours(es, tmp / name, app, "--cpu-affinity", name, PYTHONHASHSEED="1")[0]
            for name in ("auto", "off")
        }
        res = alternate(
            {
                f"{name}, {kind}": functools.partial(
                    wrk,
                    url(port),
                    SECONDS,
                    8,
                    script,
                    {"DEFER_PATH": "/"} if kind == "plain" else {},
                )
                for kind in ("plain", "mix")
                for name, port in sides.items()
            }
        )
    table("2b. --cpu-affinity auto vs off, one worker, wrk -c8 (req/s)", res, "rps", "req/s")
    for kind in ("plain", "mix"):
        ratio = med(res[f"auto, {kind}"], "rps") / med(res[f"off, {kind}"], "rps")
        goal(f"2b. cpu-affinity auto vs off, {kind}", ratio, ">= 1.0x", ratio >= 1.0)


def finish_overhead(tmp: Path) -> None:
    with contextlib.ExitStack() as es:
        port, _ = ours(es, tmp, f"{APPS}:bench")
        rate = 200
        res = alternate(
            {
                "plain": lambda: probe(port, "/", rate, SECONDS),
                "deferring 1 s": lambda: probe(port, "/defer?1", rate, SECONDS),
            }
        )
    table(f"3. Latency at {rate} req/s, plain vs deferring 1 s of work (p50 ms)", res, "p50", "ms")
    table(f"3. Latency at {rate} req/s, plain vs deferring 1 s of work (p99 ms)", res, "p99", "ms")
    chart["latency ms (p50, p99)"] = {
        f"{name} {q}": summary([getattr(r, q) for r in runs])
        for name, runs in res.items()
        for q in ("p50", "p99")
    }
    # The goal compares percentiles of all rounds' samples pooled: a p99 of one
    # round rests on a handful of requests.
    pooled = {
        name: statistics.quantiles([x for r in runs for x in r.samples], n=100)
        for name, runs in res.items()
    }
    sections.append(
        "Pooled over all rounds: "
        + "; ".join(f"{name} p50 {q[49]:.2f} ms, p99 {q[98]:.2f} ms" for name, q in pooled.items())
        + ".\n"
    )
    for label, index in (("p50", 49), ("p99", 98)):
        ratio = pooled["deferring 1 s"][index] / pooled["plain"][index]
        goal(f"3. finish overhead, {label} latency", ratio, "<= 1.1x", ratio <= 1.1)


# The capacity scenario: (label, app in apps_capacity, goal ratio). Plain functions lead:
# they are what users write (send_mail, requests.post); coroutines come second.
CAPACITY = (
    ("plain function time.sleep(0.1)", "plain", 0.9),
    ("coroutine asyncio.sleep(0.1)", "coroutine", 0.9),
    ("Flask + Jinja page, plain time.sleep(0.1)", "page", 0.95),
    ("plain function, process=True", "plain_helper", 0.9),
    ("coroutine, process=True", "coroutine_helper", 0.9),
)
START_P99_MS = 50.0


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` and of its live children (a deferred helper)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def capacity_run(tmp: Path, app: str, script: str) -> tuple[dict[str, list[Run]], dict]:
    """Alternate plain and mixed rounds on one worker; then wait for its deferred work
    to end and return the rounds and the app's /count. Each run also carries the
    worker's CPU microseconds per request (``Run.cpu_us``): on a shared machine the
    throughput swings with the neighbours' load, the CPU a request costs much less."""
    with contextlib.ExitStack() as es:
        port, pid = ours(es, tmp, f"tests.benchmarks.apps_capacity:{app}")

        def measured(env: dict[str, str]) -> Run:
            before = cpu_seconds(pid)
            run = wrk(url(port), SECONDS, 8, script, env)
            run.cpu_us = (cpu_seconds(pid) - before) / (run.rps * SECONDS) * 1e6
            return run

        # the same script with every request to /: the same Lua calls, no deferred work
        plain, mix = {"DEFER_PATH": "/"}, {}
        res = alternate({"plain": lambda: measured(plain), "mix": lambda: measured(mix)})

        def drained() -> dict:
            counts = get_json(port, "/count")
            d = counts["deferred"]
            return counts if d["queued"] + d["running"] == 0 else {}

        return res, wait_for(drained, 60, "deferred work to finish")


def capacity(tmp: Path) -> None:
    """One worker, default settings, nginx keep-conn, wrk -c8; one request in twenty
    defers 0.1 s of work. Ratio: req/s with that mix / req/s of the same requests
    without it, same server, alternating rounds (the median of the rounds' ratios);
    every deferred call must have run."""
    script = str(SCRIPTS / "one_in_twenty.lua")
    rows = [
        "### 4. Capacity: one request in twenty defers 0.1 s (one worker, wrk -c8)",
        "",
        "| deferred work | plain req/s | with the mix req/s | ratio | worker CPU µs/request, "
        "plain / mix | CPU ratio | start p99 ms | calls run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, app, target in CAPACITY:
        res, counts = capacity_run(tmp / app, app, script)
        d = counts["deferred"]
        ran = d["done"] == counts["registered"] and d["failed"] == 0
        # Each round's mix against the plain run just before it, then the median: the
        # machine's load drifts over a run, and neighbours see the same drift.
        ratio = statistics.median(
            m.rps / p.rps for p, m in zip(res["plain"], res["mix"], strict=True)
        )
        start = counts["start_p99_ms"]
        cpu_plain, cpu_mix = med(res["plain"], "cpu_us"), med(res["mix"], "cpu_us")
        rows.append(
            f"| {label} | {med(res['plain'], 'rps'):,.0f} | {med(res['mix'], 'rps'):,.0f} "
            f"| {ratio:.2f} | {cpu_plain:.0f} / {cpu_mix:.0f} | {cpu_plain / cpu_mix:.2f} "
            f"| {start:.1f} | {d['done']:,} of {counts['registered']:,} |"
        )
        goal(
            f"4. capacity, {label}",
            ratio,
            f">= {target}x, all deferred run",
            ratio >= target and ran,
            ("all run" if ran else "NOT all run") + f"; CPU ratio {cpu_plain / cpu_mix:.2f}",
        )
        goals.append(
            (
                f"4. finish-to-start p99, {label}",
                f"{start:.1f} ms",
                f"<= {START_P99_MS:g} ms",
                start <= START_P99_MS,
            )
        )
        print(
            f"{'PASS' if start <= START_P99_MS else 'FAIL'}  4. finish-to-start p99, {label}: "
            f"{start:.1f} ms (goal <= {START_P99_MS:g} ms)",
            flush=True,
        )
    sections.append("\n".join(rows) + "\n")


def large_bodies(tmp: Path) -> None:
    upload = str(SCRIPTS / "upload_5mb.lua")
    with contextlib.ExitStack() as es:
        port, _ = ours(es, tmp / "ours", f"{APPS}:bench")
        gport, _ = es.enter_context(
            harness.gunicorn_behind_nginx(tmp / "gunicorn", f"{APPS}:bench")
        )
        down = alternate(
            {
                "fcgi-finish": lambda: wrk(url(port, "/mb"), SECONDS, 4),
                "gunicorn sync": lambda: wrk(url(gport, "/mb"), SECONDS, 4),
            }
        )
        up = alternate(
            {
                "fcgi-finish": lambda: wrk(url(port, "/upload"), SECONDS, 4, upload),
                "gunicorn sync": lambda: wrk(url(gport, "/upload"), SECONDS, 4, upload),
            }
        )
    for runs in up.values():
        for r in runs:
            r.mbps = r.rps * 5
    table("5. 1 MB downloads (MB/s)", down, "mbps", "MB/s")
    table("5. 5 MB uploads (MB/s)", up, "mbps", "MB/s")
    for kind, res in (("1 MB downloads", down), ("5 MB uploads", up)):
        ratio = med(res["fcgi-finish"], "mbps") / med(res["gunicorn sync"], "mbps")
        goal(f"5. {kind} vs gunicorn", ratio, ">= 1.0x", ratio >= 1.0)


def file_downloads(tmp: Path) -> None:
    """5 MB files through nginx, one worker with default settings: wsgi.file_wrapper
    against the same file returned as a generator of 64 KB reads, alternating rounds.
    The goal is the worker's CPU per download (nginx bounds the throughput here, and
    the worker's share of that is what the file wrapper changes); MB/s beside it."""
    path = tmp / "5mb.bin"
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(5 << 20))
    with contextlib.ExitStack() as es:
        port, pid = ours(es, tmp, f"{APPS}:files", BENCH_FILE=str(path))

        def measured(where: str) -> Run:
            before = cpu_seconds(pid)
            run = wrk(url(port, where), SECONDS, 4)
            run.cpu_us = (cpu_seconds(pid) - before) / (run.rps * SECONDS) * 1e6
            return run

        res = alternate(
            {
                "wsgi.file_wrapper": lambda: measured("/wrapper"),
                "plain iterable": lambda: measured("/iterable"),
            }
        )
    table(
        "5. 5 MB file downloads, wsgi.file_wrapper or a plain iterable (MB/s)", res, "mbps", "MB/s"
    )
    mbps = med(res["wsgi.file_wrapper"], "mbps") / med(res["plain iterable"], "mbps")
    # each round's plain run against the file_wrapper run just before it, then the median
    pairs = zip(res["wsgi.file_wrapper"], res["plain iterable"], strict=True)
    cpu = statistics.median(p.cpu_us / w.cpu_us for w, p in pairs)
    sections.append(
        "Worker CPU per 5 MB download (µs): "
        + ", ".join(f"{name} {med(runs, 'cpu_us'):,.0f}" for name, runs in res.items())
        + f"; plain iterable / file_wrapper {cpu:.2f} (median of the rounds' ratios); "
        f"throughput file_wrapper / plain iterable {mbps:.2f}.\n"
    )
    goal(
        "5. file downloads, worker CPU: plain iterable / file_wrapper",
        cpu,
        ">= 1.0x",
        cpu >= 1.0,
        f"throughput ratio {mbps:.2f}",
    )


def memory(tmp: Path) -> None:
    with contextlib.ExitStack() as es:
        port, pid = ours(es, tmp, f"{APPS}:bench")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(1000):
            conn.request("GET", "/")
            conn.getresponse().read()
        conn.close()
        before = rss_kb(pid)
        while get_json(port, "/count")["requests"] < 100_000:
            wrk(url(port), 2)
        served = get_json(port, "/count")["requests"]
        after = rss_kb(pid)
    growth = (after - before) / 1024
    sections.append(
        f"### 6. Memory\n\nWorker RSS {before / 1024:.1f} MB after 1,000 requests, "
        f"{after / 1024:.1f} MB after {served:,}: {growth:+.2f} MB.\n"
    )
    goals.append(
        ("6. RSS growth, 1,000 to 100,000 requests", f"{growth:+.2f} MB", "<= 5 MB", growth <= 5)
    )
    print(f"{'PASS' if growth <= 5 else 'FAIL'}  6. RSS growth: {growth:+.2f} MB (goal <= 5 MB)")


def write_report(started: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    lines = [
        "# fcgi-finish benchmark",
        "",
        f"`make bench` ({ROUNDS} alternating rounds of {SECONDS:g} s, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
        f"took {time.time() - started:.0f} s). Ratios compare medians from the same run. "
        f"Python {platform.python_version()} ({os.path.realpath(sys.executable)}), which "
        "uWSGI is built against.",
        "",
        "| goal | measured | target | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {m} | {t} | {'PASS' if ok else 'FAIL'} |" for n, m, t, ok in goals]
    lines += ["", *sections]
    if chart:  # only the hello-world and latency scenarios draw
        lines += ["![throughput and latency](bench.png)", ""]
        draw_chart(OUT / "bench.png")
    (OUT / "report.md").write_text("\n".join(lines))
    print(f"\nreport: {OUT / 'report.md'}" + (f", chart: {OUT / 'bench.png'}" if chart else ""))


def draw_chart(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(chart), figsize=(6 * len(chart), 4.5))
    for ax, (title, data) in zip(axes if len(chart) > 1 else [axes], chart.items(), strict=True):
        names = list(data)
        mids = [data[n][0] for n in names]
        errs = [
            [m - data[n][1] for n, m in zip(names, mids, strict=True)],
            [data[n][2] - m for n, m in zip(names, mids, strict=True)],
        ]
        ax.bar(names, mids, yerr=errs, capsize=4, color="#4878a8")
        ax.set_title(title + " (median, min-max)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def journal_cost(tmp: Path) -> None:
    """7. Where deferred work is kept: one request in twenty deferring 0.1 s, in memory
    and with the SQLite journal on two sides of one worker, then in memory and handed to
    Celery (real Redis, a real ``celery worker``), directly and through the journal as
    its outbox. Celery is measured apart, after the journal: its worker's backlog would
    load the machine while the journal's goal is measured."""
    from tests.test_celery import celery_worker, redis  # only this scenario needs them

    journal = tmp / "journal" / "deferred.sqlite3"
    outbox = tmp / "celery" / "outbox.sqlite3"
    with contextlib.ExitStack() as es:
        where = ours(es, tmp / "journal", f"{APPS}:kept", BENCH_JOURNAL=str(journal))
        res = _paired_rounds({"memory": (*where, "/memory"), "journal": (*where, "/journal")})
        _emptied(journal)
    with contextlib.ExitStack() as es:
        broker = es.enter_context(redis(_made(tmp / "redis")))
        es.enter_context(celery_worker(tmp / "redis", broker))
        env = {"BENCH_CELERY": broker, "BENCH_OUTBOX": str(outbox)}
        where = ours(es, tmp / "celery", f"{APPS}:kept", **env)
        sides = {
            "memory (again)": (*where, "/memory"),
            "celery": (*where, "/celery"),
            "celery, journal as outbox": (*where, "/outbox"),
        }
        res.update(_paired_rounds(sides))
        _emptied(outbox)  # every call handed over, and marked so
    table(
        "7. Where deferred work is kept, one request in twenty deferring (req/s)",
        res,
        "rps",
        "req/s",
    )

    def ratio(name: str, base: str) -> float:
        pairs = zip(res[name], res[base], strict=True)
        return statistics.median(r.rps / b.rps for r, b in pairs)

    journal_ratio = ratio("journal", "memory")
    celery_ratio = ratio("celery", "memory (again)")
    outbox_ratio = ratio("celery, journal as outbox", "memory (again)")
    cpu = {name: med(runs, "cpu_us") for name, runs in res.items()}
    cpu_journal = cpu["memory"] / cpu["journal"]
    cpu_outbox = cpu["memory (again)"] / cpu["celery, journal as outbox"]
    sections.append(
        f"Median of the rounds' ratios against memory: journal {journal_ratio:.2f}x, "
        f"Celery (a background publisher, several requests per task) {celery_ratio:.2f}x, "
        f"Celery with the journal as its outbox {outbox_ratio:.2f}x; every journaled call "
        "ran, every outbox call was handed over (both journals ended empty). Worker CPU per "
        "request (µs): "
        + ", ".join(f"{name} {us:.0f}" for name, us in cpu.items())
        + f"; memory / journal {cpu_journal:.2f}, memory / outbox {cpu_outbox:.2f}.\n"
    )
    goal(
        "7. journal cost, 1 in 20 deferring",
        journal_ratio,
        ">= 0.9x",
        journal_ratio >= 0.9,
        f"CPU ratio {cpu_journal:.2f}",
    )
    goal(
        "7. Celery through the journal (outbox), 1 in 20 deferring",
        outbox_ratio,
        ">= 0.9x",
        outbox_ratio >= 0.9,
        f"CPU ratio {cpu_outbox:.2f}; Celery direct {celery_ratio:.2f}x",
    )


def _emptied(path: Path) -> None:
    """Wait for the journal at ``path`` to have nothing pending."""
    with contextlib.closing(Journal(path, app=None)) as kept:
        wait_for(lambda: kept.counts()["journal_pending"] == 0, 120, f"{path.name} to empty")


def context_cost(tmp: Path) -> None:
    """7. What running each call in its request's context costs: one request in twenty
    deferring a plain 0.1 s call in memory, three sides of one worker: deferred as users
    do (the context captured), appended without a context (defer() before contexts), and
    in an OpenTelemetry span (an SDK tracer, spans batched and dropped), each of the
    last two in rounds against the first."""
    with contextlib.ExitStack() as es:
        port, pid = ours(es, tmp, f"{APPS}:kept")
        sides = {name: (port, pid, f"/{name}") for name in ("uncaptured", "plain", "traced")}
        # the goal's pair alone, then the traced side against the same baseline: spans
        # leave work (their export, their garbage) that would land in the next side's round
        res = _paired_rounds({name: sides[name] for name in ("uncaptured", "plain")})
        again = _paired_rounds({name: sides[name] for name in ("uncaptured", "traced")})
        res["uncaptured (again)"], res["traced"] = again["uncaptured"], again["traced"]

        def drained() -> dict[str, dict]:
            counts = {name: get_json(port, f"/{name}/count") for name in sides}
            idle = all(c["queued"] + c["running"] == 0 for c in counts.values())
            return counts if idle else {}

        counts = wait_for(drained, 60, "deferred work to finish")
    ran = all(c["done"] == c["registered"] and not c["failed"] for c in counts.values())
    table("7. The request's context for each call, 1 in 20 deferring (req/s)", res, "rps", "req/s")

    def ratio(name: str, base: str) -> float:
        pairs = zip(res[name], res[base], strict=True)
        return statistics.median(r.rps / b.rps for r, b in pairs)

    captured, traced = ratio("plain", "uncaptured"), ratio("traced", "uncaptured (again)")
    cpu = {name: med(runs, "cpu_us") for name, runs in res.items()}
    sections.append(
        f"Median of the rounds' ratios against no context: context captured {captured:.3f}x, "
        f"with an OpenTelemetry span per call {traced:.3f}x. Worker CPU per request (µs): "
        + ", ".join(f"{name} {us:.0f}" for name, us in cpu.items())
        + ". Calls run: "
        + ", ".join(f"{name} {c['done']:,} of {c['registered']:,}" for name, c in counts.items())
        + ".\n"
    )
    goal(
        "7. context capture cost, 1 in 20 deferring a plain call",
        captured,
        ">= 0.98x, all deferred run",
        captured >= 0.98 and ran,
        ("all run" if ran else "NOT all run")
        + f"; traced {traced:.3f}x; CPU ratio {cpu['uncaptured'] / cpu['plain']:.3f}, "
        f"traced {cpu['uncaptured (again)'] / cpu['traced']:.3f}",
    )


def _paired_rounds(sides: dict[str, tuple[int, int, str]]) -> dict[str, list[Run]]:
    """Alternating rounds of each side (port, worker pid, path prefix), more and shorter
    than the other scenarios, after a warm-up: the goal is the median of each round's
    own ratio, which drift on a shared machine spares."""
    script = str(SCRIPTS / "one_in_twenty.lua")
    seconds = max(2, round(SECONDS / 2))  # wrk takes whole seconds
    res: dict[str, list[Run]] = {name: [] for name in sides}
    order = list(sides)
    for round_ in range(max(2 * ROUNDS, 12) + 1):
        for name in order if round_ % 2 else reversed(order):  # A B, B A: no side always first
            port, pid, prefix = sides[name]
            before = cpu_seconds(pid)
            run = wrk(url(port), seconds, script=script, env={"PREFIX": prefix})
            run.cpu_us = (cpu_seconds(pid) - before) / (run.rps * seconds) * 1e6
            if round_:
                res[name].append(run)
    return res


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


SCENARIOS = {
    "hello": hello_world,
    "page": flask_page,
    "scaling": scaling,
    "affinity": cpu_affinity,
    "finish": finish_overhead,
    "capacity": capacity,
    "bodies": large_bodies,
    "files": file_downloads,
    "memory": memory,
    "journal": journal_cost,
    "context": context_cost,
}


def main() -> int:
    started = time.time()
    chosen = sys.argv[1:] or list(SCENARIOS)
    with tempfile.TemporaryDirectory(prefix="fcgi-bench-") as tmp:
        for name in chosen:
            print(f"-- {name}", flush=True)
            SCENARIOS[name](Path(tmp) / name)
    write_report(started)
    print("\n".join(f"{'PASS' if ok else 'FAIL'}  {n}: {m} (goal {t})" for n, m, t, ok in goals))
    return 0 if all(ok for *_, ok in goals) else 1


if __name__ == "__main__":
    raise SystemExit(main())
