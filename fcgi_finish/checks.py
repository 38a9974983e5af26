"""The checks before start: what would make the stack fail later, found in a second
and named with its fix, before anything runs.

nginx's port is free; nginx is installed; the workers' user (RUN_USER) can run the
python, import the code and find the app in its folder (a folder above closed to
other users, as /root is, is named with its ``chmod``); the app's SQLite files
(Django's DATABASES, ``*.sqlite3`` in the app's folder) are writable by that user.
What needs the user's own eyes runs as that user, in a child process with the
workers' python and environment.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import socket
import stat
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

# Run as RUN_USER with the workers' python and environment: ARGS are FCGI_CHDIR,
# FCGI_PYTHONPATH and APP. Prints a JSON list of problems. Standard library only past
# its first check (the code imports), so each check runs whatever the others find.
_PROBE = r"""
import glob, importlib, importlib.util, json, os, re, sys
problems = []
def report():
    print(json.dumps(problems))
    sys.exit(0)
try:
    import fcgi, wsgi_app
except Exception as exc:
    problems.append({"kind": "code", "error": f"{type(exc).__name__}: {exc}"})
chdir, pythonpath, app = sys.argv[1:4]
try:  # as the worker's --chdir and --pythonpath do (fcgi.cli.setup_path)
    os.chdir(chdir)
except OSError as exc:
    problems.append({"kind": "chdir", "error": f"{chdir}: {exc.strerror}"})
    report()
sys.path.insert(0, os.getcwd())
for folder in reversed([p for p in pythonpath.split(",") if p]):
    sys.path.insert(0, os.path.abspath(folder))
module = app.partition(":")[0]
try:
    spec = importlib.util.find_spec(module)
except ModuleNotFoundError:
    spec = None
except Exception:  # a package above the module raised: the worker shows the traceback
    spec = False
if spec is None:
    problems.append({"kind": "module", "module": module})
databases = []
settings = os.environ.get("DJANGO_SETTINGS_MODULE")
if not settings and spec and spec.origin and spec.origin.endswith(".py"):
    try:
        source = open(spec.origin, encoding="utf-8").read()
    except OSError:
        source = ""
    found = re.search(r"DJANGO_SETTINGS_MODULE['\"]\s*,\s*['\"]([\w.]+)['\"]", source)
    settings = found.group(1) if found else None
if settings:
    try:
        configured = importlib.import_module(settings).DATABASES
    except Exception:  # the worker shows it
        configured = {}
    for db in configured.values():
        name = str(db.get("NAME", ""))
        if "sqlite3" in str(db.get("ENGINE", "")) and name and ":memory:" not in name:
            databases.append(("Django's DATABASES in " + settings, os.path.abspath(name)))
for pattern in ("*.sqlite3", "*.sqlite", "*.db"):
    for name in glob.glob(pattern):
        databases.append(("in the app's folder", os.path.abspath(name)))
seen = set()
for source, path in databases:
    if path in seen:
        continue
    seen.add(path)
    folder = os.path.dirname(path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        problems.append({"kind": "sqlite", "path": path, "source": source})
    elif os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        problems.append({"kind": "sqlite-folder", "path": path, "source": source})
report()
"""


class CheckFailed(Exception):
    """The stack cannot start as configured; the message names the cause and the fix."""


def port_free(listen: str) -> None:
    """nginx can listen on ``listen``; else the error names who holds it and, if there is
    one, a port near it that is free now."""
    host_text, _, port_text = listen.rpartition(":")
    host, port = host_text.strip("[]") or "0.0.0.0", int(port_text)
    exc = _bind_error(host, port)
    if exc is None:
        return
    why = "another program is listening there" if exc.errno == errno.EADDRINUSE else exc.strerror
    other = free_port_near(host, port)
    fix = (
        f"choose another port: fcgi-finish start --listen {host_text}:{other} (make start "
        f"NGINX_LISTEN={host_text}:{other}), free now"
        if other
        else "choose another port: fcgi-finish start --listen HOST:PORT"
    )
    raise CheckFailed(
        f"nginx cannot listen on {listen} (port {port}): {why}. See which with "
        f"`ss -ltnp 'sport = :{port}'`; stop it, or {fix}"
    )


def free_port_near(host: str, port: int, tries: int = 20) -> int | None:
    """The first of the ``tries`` ports after ``port`` that ``host`` can listen on now."""
    for other in range(port + 1, min(port + tries, 65535) + 1):
        if _bind_error(host, other) is None:
            return other
    return None


def _bind_error(host: str, port: int) -> OSError | None:
    """Why a listener on host:port fails now (None: it can), binding as nginx does
    (SO_REUSEADDR: a port left in TIME_WAIT is free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def nginx_installed(nginx_bin: str, given: bool = True) -> None:
    """``given``: NGINX_BIN names it; else it was looked for on PATH and in /usr/sbin."""
    if not (os.path.isfile(nginx_bin) and os.access(nginx_bin, os.X_OK)):
        where = f"no program at NGINX_BIN={nginx_bin}" if given else "not on PATH nor in /usr/sbin"
        raise CheckFailed(
            f"nginx is not installed ({where}): as root, apt-get install -y nginx-light (from "
            "a checkout, `make install` does it), or give NGINX_BIN=/path/to/nginx"
        )


def tls_files(cert: str, key: str) -> None:
    if bool(cert) != bool(key):
        raise CheckFailed("HTTPS takes both TLS_CERT and TLS_KEY (--tls-cert, --tls-key)")
    for name, path in (("TLS_CERT", cert), ("TLS_KEY", key)):
        if path and not os.path.isfile(path):
            raise CheckFailed(f"{name}={path}: no such file")


def closed_folders(user: str, paths: Iterable[Path], listed: Iterable[Path] = ()) -> list[Path]:
    """The folders that keep ``user`` from ``paths``, judged from their mode bits (the
    folders above may hide them from the user): each folder above a path must let the
    user traverse it; each folder of ``listed`` must also let it read (list) it."""
    entry = pwd.getpwnam(user)
    groups = {g.gr_gid for g in grp.getgrall() if user in g.gr_mem} | {entry.pw_gid}
    need: dict[Path, int] = {}
    for path in paths:
        for folder in Path(os.path.abspath(path)).parents:
            need.setdefault(folder, 0)
            need[folder] |= 1  # x
    for folder in listed:
        folder = Path(os.path.abspath(folder))
        need[folder] = need.get(folder, 0) | 5  # r and x
        for above in folder.parents:
            need.setdefault(above, 0)
            need[above] |= 1
    closed = []
    for folder, bits in sorted(need.items(), key=lambda item: len(item[0].parts)):
        try:
            st = folder.stat()
        except OSError:
            continue
        if entry.pw_uid == 0:
            continue
        if st.st_uid == entry.pw_uid:
            mode = (st.st_mode >> 6) & 7
        elif st.st_gid in groups:
            mode = (st.st_mode >> 3) & 7
        else:
            mode = st.st_mode & 7
        if mode & bits != bits:
            closed.append(folder)
    return closed


def _modes(folders: Iterable[Path]) -> str:
    return ", ".join(f"{f} (mode {stat.S_IMODE(f.stat().st_mode):o})" for f in folders)


def workers_can_run(
    user: str,
    python: str,
    code: Iterable[Path],
    app_dirs: Iterable[Path],
    app: str,
    pythonpath: str,
    env: Mapping[str, str],
) -> None:
    """Run the probe as ``user``; raise naming every problem and its fix."""
    app_dirs = list(app_dirs)
    closed = closed_folders(user, [Path(python), Path(os.path.realpath(python)), *code], app_dirs)
    as_user: dict[str, object] = {}
    if os.geteuid() == 0 and user != "root":
        entry = pwd.getpwnam(user)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": _groups(user)}
    cmd = [python, "-c", _PROBE, str(app_dirs[0]), pythonpath, app]
    try:
        result = subprocess.run(
            cmd, env=dict(env), cwd="/", capture_output=True, text=True, timeout=60, **as_user
        )
        problems = json.loads(result.stdout or "null")
        if problems is None:
            problems = [{"kind": "code", "error": result.stderr.strip() or "no answer"}]
    except PermissionError as exc:
        problems = [{"kind": "code", "error": str(exc)}]
    if not problems:
        return
    lines = []
    reach = [p for p in problems if p["kind"] in ("code", "chdir", "module")]
    if closed and reach:
        lines.append(
            f"RUN_USER {user} cannot reach the app, its code or its python: closed to "
            f"other users: {_modes(closed)}"
        )
        listed = [f for f in closed if f in app_dirs]
        traverse = [f for f in closed if f not in app_dirs]
        fixes = []
        if traverse:
            fixes.append(
                "chmod o+x " + " ".join(map(str, traverse)) + "   (traverse only: nobody can "
                "list them)"
            )
        if listed:
            fixes.append("chmod o+rx " + " ".join(map(str, listed)) + "   (the app's folder)")
        lines.append("  fix one of: " + " && ".join(fixes))
        lines.append(
            f"          or: put the app and its virtualenv where {user} can reach them "
            "(e.g. /srv/mysite, a virtualenv made from /usr/bin/python3)"
        )
        lines.append("          or: run the app as root on purpose: RUN_USER=root (--user root)")
    for problem in reach:
        if problem["kind"] == "code":
            if not closed:
                lines.append(
                    f"RUN_USER {user} cannot import the code with {python}: {problem['error']}"
                )
        elif problem["kind"] == "chdir":
            if closed:
                lines.append(f"FCGI_CHDIR: {problem['error']}")
            else:
                lines.append(
                    f"FCGI_CHDIR={problem['error']}: give the folder that holds the app with "
                    "FCGI_CHDIR=... (--chdir)"
                )
        elif not closed:
            lines.append(
                f"cannot import module {problem['module']!r} from FCGI_CHDIR={app_dirs[0]}"
                + (f" with FCGI_PYTHONPATH={pythonpath}" if pythonpath else "")
                + ": give the folder that holds it with FCGI_CHDIR=... (--chdir), and "
                "FCGI_PYTHONPATH=src for a src/ layout"
            )
    for problem in problems:
        if problem["kind"] in ("sqlite", "sqlite-folder"):
            path = Path(problem["path"])
            where = path if problem["kind"] == "sqlite" else path.parent
            st = where.stat()
            owner = pwd.getpwuid(st.st_uid).pw_name
            lines.append(
                f"RUN_USER {user} cannot write {where} (owner {owner}, mode "
                f"{stat.S_IMODE(st.st_mode):o}), "
                + (
                    "a SQLite database"
                    if problem["kind"] == "sqlite"
                    else f"the folder of the SQLite database {path}"
                )
                + f" the app writes ({problem['source']}): its first write (a login, a form) "
                "would fail with a 500"
            )
            lines.append(
                f"  fix: chown {user} {path} {path.parent}   (SQLite writes a journal beside "
                "the database), or move the database into a folder of its own that "
                f"{user} owns"
            )
    if lines:
        raise CheckFailed("\n".join(lines))


def _groups(user: str) -> list[int]:
    return [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
