"""Behind Apache httpd (mod_proxy_fcgi, enablereuse=on), lighttpd and Caddy, with the
shipped configs and each server's stock path handling."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.gate import Gate
from tests.procs import HTTP, web_server, worker

pytestmark = pytest.mark.e2e


@pytest.fixture
def socket_dir():
    """A folder the web server's own user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fcgi-sock-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("server", ["apache", "lighttpd", "caddy"])
def test_behind_other_web_servers(tmp_path, socket_dir, server):
    group = ["--socket-group", "www-data"] if os.getuid() == 0 else []
    with (
        worker(socket_dir, "tests.apps:router", *group) as (_proc, sock),
        web_server(server, tmp_path, sock) as port,
        HTTP(port) as client,
    ):
        resp, body, _ = client.get("/some/path?x=1")
        assert resp.status == 200, body
        assert (resp.getheader("X-Script-Name"), resp.getheader("X-Path-Info")) == (
            "[]",
            "[/some/path]",
        ), "the root-mounted app must see the whole path in PATH_INFO"

        with Gate(tmp_path / "gate") as gate:  # each answered while its work is held
            for i in range(3):
                resp, body, _ = client.get(f"/defer?gate={gate.path}&tag={i}")
                assert resp.status == 200 and body == f"deferred {i}\n".encode()
            resp, body, _ = client.get(f"/php?gate={gate.path}")
            assert body == b"program start...\n"

        upload = bytes(range(256)) * 240  # 60 KB
        resp, body, _ = client.get("/upload", method="POST", body=upload)
        assert resp.status == 200 and body == upload
