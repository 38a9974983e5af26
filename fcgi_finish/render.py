"""Rendering the templates: ``@NAME@`` placeholders filled, comment lines left as written.

The stack's three files (nginx, supervisord, the systemd unit) are package data in
``fcgi_finish/templates``; the other web servers' configs in the checkout's ``conf/``
(Apache, lighttpd, Caddy, HAProxy) use the same placeholders for one listen address,
socket and state folder (``web_server_values``). A placeholder left without a value is
an error, never an ``@NAME@`` in a running config.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@")


def template(name: str) -> str:
    """A template shipped in the package (nginx.conf, supervisord.conf, ...)."""
    return (resources.files("fcgi_finish") / "templates" / name).read_text(encoding="utf-8")


def render(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``@NAME@`` outside comment lines (``#``, ``;``) replaced by
    ``values[NAME]``; the lines of a multi-line value keep the placeholder's indentation."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(("#", ";")):
            out.append(line)
            continue
        indent = line[: len(line) - len(line.lstrip())]

        def fill(match: re.Match[str], indent: str = indent) -> str:
            name = match.group(1)
            if name not in values:
                raise KeyError(f"the template's @{name}@ has no value")
            return values[name].replace("\n", "\n" + indent)

        out.append(_PLACEHOLDER.sub(fill, line))
    return "".join(out)


def mime_types(nginx_bin: str = "nginx") -> str:
    """The installed nginx's mime.types: Debian's, or the one beside another build's
    nginx.conf (``nginx -V`` names it)."""
    if os.path.exists("/etc/nginx/mime.types"):
        return "/etc/nginx/mime.types"
    binary = shutil.which(nginx_bin) or nginx_bin
    try:
        shown = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    except OSError:
        shown = ""
    match = re.search(r"--conf-path=(\S+)", shown)
    conf = match.group(1) if match else "/etc/nginx/nginx.conf"
    return str(Path(conf).parent / "mime.types")


def nginx_user_line(run_user: str) -> str:
    """nginx's ``user`` line: started as root, the stack's unprivileged user and its
    group; otherwise nothing (nginx runs as whoever starts it)."""
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    group = grp.getgrgid(pwd.getpwnam(run_user).pw_gid).gr_name
    return f"user {run_user} {group};"


def web_server_values(
    listen: str, socket_path: str | Path, var: str | Path, run_user: str = "root"
) -> dict[str, str]:
    """The placeholders every web server template shares: @LISTEN@ (HOST:PORT), @HOST@,
    @PORT@, @SOCKET@, @VAR@, @USER@ (nginx's user line), @STATIC@, @MIME_TYPES@, and
    nginx's TLS and load-balancer lines, off."""
    host, _, port = listen.rpartition(":")
    return {
        "LISTEN": listen,
        "HOST": host,
        "PORT": port,
        "SOCKET": str(socket_path),
        "VAR": str(var),
        "USER": nginx_user_line(run_user),
        "STATIC": str(Path(var) / "static"),
        "MIME_TYPES": mime_types(),
        "SSL": "",
        "TLS": "",
        "REAL_IP": "",
        "PROXIES": "",
    }


def tls_values(cert: str, key: str) -> dict[str, str]:
    """nginx's HTTPS lines for @SSL@ and @TLS@."""
    if not cert:
        return {"SSL": "", "TLS": ""}
    return {
        "SSL": " ssl",
        "TLS": "\n".join(
            (
                f"ssl_certificate     {cert};",
                f"ssl_certificate_key {key};",
                "ssl_protocols       TLSv1.2 TLSv1.3;",
                "ssl_session_cache   shared:TLS:1m;",
            )
        ),
    }


def proxy_values(proxies: tuple[str, ...]) -> dict[str, str]:
    """nginx's lines for @REAL_IP@ and @PROXIES@: the load balancers it trusts."""
    return {
        "REAL_IP": "\n".join(f"set_real_ip_from {p};" for p in proxies),
        "PROXIES": "\n".join(f"{p} 1;" for p in proxies),
    }
