"""Logs that fit: the worker's lines survive an app's LOGGING, carry the request id, and
come as text with a UTC offset or as JSON; the access log in combined or JSON form, with
every value escaped so no request can forge a line."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from fcgi.ops.logs import JSONFormatter, TextFormatter
from tests.fcgi_client import Client
from tests.procs import wait_for, worker

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"
HOSTILE_URI = '/x\n2026-01-01 forged "GET /admin" 200\r\t\\end'


def test_worker_lines_survive_an_apps_django_style_logging(tmp_path):
    with worker(tmp_path, "tests.apps_dayone_logging:application") as (proc, sock):
        client = Client(str(sock))
        assert client.request("/boom").status == 500
        assert client.request("/").status == 200
        client.close()
        log = tmp_path / "app.log"
        text = wait_for(lambda: "Traceback" in log.read_text() and log.read_text(), 10, "error")
    # The worker's own format, untouched by the app's root handler ("APP ..."), with
    # the request id the access log uses.
    line = next(ln for ln in text.splitlines() if "application error" in ln)
    assert re.match(
        rf"{STAMP} \[{proc.pid}\] ERROR fcgi: .*application error.* id={proc.pid}-1$", line
    )
    assert "RuntimeError: boom in the app" in text
    assert "APP " not in text


def test_json_error_and_access_logs_parse_line_by_line(tmp_path):
    access = tmp_path / "access.log"
    args = ["--log-format", "json", "--access-log", str(access), "--access-log-format", "json"]
    with worker(tmp_path, "tests.apps_dayone:fails", *args) as (proc, sock):
        client = Client(str(sock))
        assert client.request("/").status == 200
        assert client.request("/boom").status == 500
        hostile = {"REQUEST_URI": HOSTILE_URI, "HTTP_USER_AGENT": 'ua"\n{"x": 1}'}
        assert client.request("/", extra=hostile).status == 200
        client.close()
        wait_for(lambda: len(access.read_text().splitlines()) == 3, 10, "three access lines")
        errors = [json.loads(ln) for ln in (tmp_path / "app.log").read_text().splitlines()]
    lines = [json.loads(ln) for ln in access.read_text().splitlines()]
    assert [ln["uri"] for ln in lines] == ["/", "/boom", HOSTILE_URI]
    assert [ln["status"] for ln in lines] == [200, 500, 200]
    assert lines[2]["agent"] == 'ua"\n{"x": 1}'
    assert all(re.fullmatch(STAMP, ln["time"]) for ln in lines + errors)
    (error,) = [e for e in errors if e["level"] == "ERROR"]
    assert error["request_id"] == lines[1]["id"] == f"{proc.pid}-2"
    assert "RuntimeError: boom in the app" in error["exception"]
    assert error["pid"] == proc.pid and error["logger"] == "fcgi"


def test_combined_access_log_escapes_every_field(tmp_path):
    access = tmp_path / "access.log"
    args = ["--access-log", str(access), "--access-log-format", "combined"]
    with worker(tmp_path, "tests.apps_dayone:fails", *args) as (proc, sock):
        client = Client(str(sock))
        extra = {
            "REQUEST_URI": HOSTILE_URI,
            "REMOTE_ADDR": "10.0.0.7",
            "HTTP_REFERER": "https://example.org/",
            "HTTP_USER_AGENT": 'curl/8 "quoted"',
        }
        assert client.request("/", extra=extra).status == 200
        client.close()
        line = wait_for(lambda: access.read_text(), 10, "the access line")
    assert line.count("\n") == 1  # the line feed in the URI did not start a line
    combined = (
        r"(?P<remote>\S+) - - \[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] "
        r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) "(?P<referer>[^"]*)" '
        r'"(?P<agent>[^"]*)" rt=(?P<rt>\d+\.\d{3}) id=(?P<id>\S+)\n'
    )
    match = re.fullmatch(combined, line)
    assert match, line
    assert match["remote"] == "10.0.0.7" and match["status"] == "200" and match["bytes"] == "3"
    assert match["request"] == (
        "GET /x\\x0A2026-01-01 forged \\x22GET /admin\\x22 200\\x0D\\x09\\x5Cend HTTP/1.1"
    )
    assert match["agent"] == "curl/8 \\x22quoted\\x22" and match["id"] == f"{proc.pid}-1"


def test_a_json_shaped_template_stays_json(tmp_path):
    access = tmp_path / "access.log"
    fmt = '{{"uri": "{uri}", "status": {status}, "id": "{id}"}}'
    args = ["--access-log", str(access), "--access-log-format", fmt]
    with worker(tmp_path, "tests.apps_dayone:fails", *args) as (_proc, sock):
        client = Client(str(sock))
        assert client.request("/", extra={"REQUEST_URI": HOSTILE_URI}).status == 200
        client.close()
        line = wait_for(lambda: access.read_text(), 10, "the access line")
    assert json.loads(line)["uri"] == HOSTILE_URI


def test_fields_given_to_a_record_are_in_both_formats():
    """extra= fields, or a filter's: deferred work's lines give request_id and trace_id."""
    record = logging.LogRecord("wsgi_app.deferred", logging.ERROR, __file__, 1, "x %s", (1,), None)
    record.request_id, record.trace_id, record.odd = "7-1", "ab" * 16, Path("/x")
    data = json.loads(JSONFormatter().format(record))
    assert (data["message"], data["request_id"], data["trace_id"]) == ("x 1", "7-1", "ab" * 16)
    assert data["odd"] == "PosixPath('/x')"  # what JSON cannot hold, as its repr
    assert TextFormatter().format(record).endswith(f" x 1 id=7-1 trace={'ab' * 16}")
