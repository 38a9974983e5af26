"""The listening socket: created from ``--bind``, or inherited on fd 0.

Errors come out as ``ListenError`` whose message says what went wrong and
how to fix it; the CLI prints that one line and exits.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat

LISTEN_FD = 0


class ListenError(Exception):
    """The socket cannot be had; the message names the fix."""


class Listener:
    """A listening socket, plus the unix socket file to remove when we are done with it."""

    def __init__(self, sock: socket.socket, path: str | None = None) -> None:
        self.sock = sock
        self.path = path
        self._inode = os.stat(path).st_ino if path else None
        sock.setblocking(False)

    def describe(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        name = self.sock.getsockname()
        return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else f"fd {LISTEN_FD} ({name})"

    def close(self) -> None:
        self.sock.close()
        if self.path:
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass


def open_listener(
    bind: str | None, mode: int = 0o660, backlog: int = 1024, group: str = ""
) -> Listener:
    if bind is None:
        return _inherited()
    if bind.startswith("unix:"):
        return _unix(bind[5:], mode, backlog, group)
    host, _, port = bind.rpartition(":")
    return _tcp(host.strip("[]"), int(port), backlog)


def _inherited() -> Listener:
    try:
        sock = socket.socket(fileno=LISTEN_FD)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if not listening:
        raise ListenError(
            f"no --bind given and fd {LISTEN_FD} is not a listening socket: pass "
            "--bind unix:PATH or --bind HOST:PORT, or run under supervisor's [fcgi-program]"
        )
    return Listener(sock)


def _unix(path: str, mode: int, backlog: int, group: str = "") -> Listener:
    path = os.path.abspath(path)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)  # no moment where the socket is wider open than mode
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ListenError(
                f"cannot create socket {path}: permission denied; bind "
                "somewhere this user may write, or fix the folder's owner"
            ) from None
        if exc.errno == errno.ENOENT:
            raise ListenError(
                f"cannot create socket {path}: folder {os.path.dirname(path)} "
                "does not exist; create it first (mkdir -p)"
            ) from None
        raise ListenError(f"cannot create socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, PermissionError) as exc:
            sock.close()
            os.unlink(path)
            raise ListenError(
                f"cannot give socket {path} to group {group!r} ({exc}); the user "
                "running the worker must be a member of that group"
            ) from None
    sock.listen(backlog)
    return Listener(sock, path)


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(
            f"cannot bind unix:{path}: a file that is not a socket is there; "
            "move it or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # left behind by a worker that died; nobody listens
        return
    finally:
        probe.close()
    raise ListenError(
        f"cannot bind unix:{path}: another process is listening there; "
        "stop it or choose another path"
    )


def _tcp(host: str, port: int, backlog: int) -> Listener:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"cannot bind {host}:{port}: the port is in use; stop what uses "
                "it (ss -ltnp) or choose another port"
            ) from None
        if exc.errno == errno.EACCES:
            raise ListenError(
                f"cannot bind {host}:{port}: permission denied; ports below 1024 "
                "need root, choose a higher one"
            ) from None
        raise ListenError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    return Listener(sock)
