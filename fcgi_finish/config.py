"""The stack's one configuration: a file in the state folder, and what is in force.

``STATE/fcgi-finish.env`` holds one ``KEY=value`` a line with comments, the format
systemd's ``EnvironmentFile=`` reads as it is, so the rendered unit and every command
read the same file. What is in force comes, from weakest to strongest, from the
table's default, the file, the environment (``FCGI_*`` and ``DEFERRED_*`` only: the
namespaced names) and the command line; values from the last two are saved into the
file, so a later bare command (a restart, the unit) runs the same stack.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .settings import BY_KEY, ENTRIES, Entry, SettingError, check_key, check_value, is_setting_name

FILE_NAME = "fcgi-finish.env"
DEFAULT = "default"
ENVIRONMENT = "environment"
COMMAND_LINE = "command line"

_LINE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)")
_COMMENTED = re.compile(r"#([A-Z_][A-Z0-9_]*)=")
_PLAIN = re.compile(r"[\w@%+=:,./-]*")

HEADER = """\
# fcgi-finish: this stack's configuration, one KEY=value a line.
#
# Every entry point reads it: fcgi-finish start|run|restart|reload|status|logs|service|
# config, the Makefile's targets (make start, ...), and the systemd unit of `fcgi-finish
# service` (EnvironmentFile=). A value given on a command line (fcgi-finish start KEY=VALUE
# or its --flag, make start KEY=VALUE) or in the environment (FCGI_*, DEFERRED_*) wins
# over this file and is saved here. A line commented out shows the default.
# `fcgi-finish config` prints what is in force and where each value came from.
# systemd reads this file as it is: no spaces around "=", and a value with spaces,
# quotes or $ goes in double quotes ("...", with \\" \\\\ \\$ inside).
"""
GROUPS = {
    "stack": "The stack: the app, the pool, nginx",
    "worker": "The workers' options (fcgi-serve --help), FCGI_<OPTION>",
    "deferred": "Deferred work after the response (wsgi_app.deferred), DEFERRED_<SETTING>",
}


@dataclass(frozen=True)
class Value:
    text: str
    origin: str  # DEFAULT, ENVIRONMENT, COMMAND_LINE, or "FILE:LINE"


class Config:
    """The settings in force for one state folder, each with where it came from."""

    def __init__(self, state: Path, values: dict[str, Value]) -> None:
        self.state = state
        self.values = values

    @property
    def file(self) -> Path:
        return self.state / FILE_NAME

    def __getitem__(self, key: str) -> str:
        return self.values[key].text

    def path(self, key: str) -> Path:
        """A setting that names a file or folder; a relative one is relative to the
        folder above the state folder (where fcgi-finish runs, with the default ./var)."""
        return self.state.parent / self.values[key].text

    def given(self) -> dict[str, str]:
        """What the environment and the command line set: what a save writes."""
        return {
            k: v.text for k, v in self.values.items() if v.origin in (ENVIRONMENT, COMMAND_LINE)
        }

    def worker_environment(self) -> dict[str, str]:
        """The FCGI_* and DEFERRED_* variables the workers get: every one not left at
        the worker's own default (the stack's defaults of FCGI_CHDIR and DEFERRED_JOURNAL
        included)."""
        env = {}
        for entry in ENTRIES:
            if entry.group == "stack":
                continue
            value = self.values[entry.key]
            if value.origin != DEFAULT or callable(entry.default):
                env[entry.key] = value.text
        return env

    def describe(self) -> str:
        """Each setting in force and where it came from, as ``fcgi-finish config`` prints."""
        width = max(len(f"{k}={v.text}") for k, v in self.values.items() if len(v.text) < 60)
        lines = [f"# {self.file}"]
        for entry in ENTRIES:
            value = self.values[entry.key]
            pair = f"{entry.key}={quote(value.text)}"
            lines.append(f"{pair:<{width + 2}} # {value.origin}")
        return "\n".join(lines) + "\n"


def load(
    state: Path,
    given: Mapping[str, str] = {},
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """What is in force in ``state``: defaults, then the file, the environment and
    ``given`` (the command line). Every problem is reported at once, each naming the fix."""
    state = state.absolute()
    problems: list[str] = []
    values = {e.key: Value(e.default_for(state), DEFAULT) for e in ENTRIES}
    path = state / FILE_NAME
    for key, text, line in read(path):
        _take(values, key, Value(text, f"{path}:{line}"), problems)
    for key, text in environ.items():
        if is_setting_name(key) and key not in given:  # make passes both
            _take(values, key, Value(text, ENVIRONMENT), problems)
    for key, text in given.items():
        _take(values, key, Value(text, COMMAND_LINE), problems)
    for key, value in values.items():
        if value.origin != DEFAULT:
            try:
                check_value(BY_KEY[key], value.text)
            except SettingError as exc:
                where = "" if value.origin in (COMMAND_LINE, DEFAULT) else f" (from {value.origin})"
                problems.append(f"{exc}{where}")
    if problems:
        raise SettingError("\n".join(problems))
    return Config(state, values)


def _take(values: dict[str, Value], key: str, value: Value, problems: list[str]) -> None:
    try:
        check_key(key)
    except SettingError as exc:
        where = "" if value.origin == COMMAND_LINE else f" (in {value.origin})"
        problems.append(f"{exc}{where}")
        return
    if "\n" in value.text:
        problems.append(f"{key}: a value must be one line")
        return
    values[key] = value


def read(path: Path) -> Iterable[tuple[str, str, int]]:
    """(KEY, value, line number) for each assignment in the file, as systemd reads them."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise SettingError(f"{path}:{number}: not KEY=value: {line!r}")
        out.append((match.group(1), unquote(match.group(2).strip()), number))
    return out


def unquote(raw: str) -> str:
    if raw[:1] == "'" and raw.endswith("'") and len(raw) > 1:
        return raw[1:-1]
    if raw[:1] == '"' and raw.endswith('"') and len(raw) > 1:
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    return raw


def quote(text: str) -> str:
    """The value as written in the file: bare if systemd and a shell read it so, else in
    double quotes with backslashes before \\ " $ and `."""
    if _PLAIN.fullmatch(text):
        return text
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def save(config: Config) -> bool:
    """Write what the environment and the command line set into the file, in place
    (the user's own lines and comments stay); True if the file changed."""
    path = config.file
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = template(config.state).splitlines()
    before = list(lines)
    for key, text in config.given().items():
        new = f"{key}={quote(text)}"
        found = [i for i, ln in enumerate(lines) if _assigns(ln) == key]
        if found:
            lines[found[-1]] = new
            continue
        commented = [i for i, ln in enumerate(lines) if _commented(ln) == key]
        if commented:
            lines.insert(commented[0] + 1, new)
        else:
            lines.append(new)
    if lines == before and path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return True


def write_copy(config: Config, path: Path) -> None:
    """Every setting in force, one ``KEY=value`` a line: a start leaves this beside what
    it runs, so commands that talk to the running stack use what it was started with,
    whatever the saved file says since."""
    lines = [f"# the settings this stack was started with (the saved ones: {config.file})"]
    lines += [f"{entry.key}={quote(config[entry.key])}" for entry in ENTRIES]
    tmp = path.with_name(path.name + ".new")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_copy(state: Path, path: Path) -> Config | None:
    """The settings ``write_copy`` left in ``path`` (a setting it lacks at its default);
    None if there is none."""
    if not path.exists():
        return None
    state = state.absolute()
    values = {e.key: Value(e.default_for(state), DEFAULT) for e in ENTRIES}
    for key, text, line in read(path):
        if key in values:
            values[key] = Value(text, f"{path}:{line}")
    return Config(state, values)


def _assigns(line: str) -> str | None:
    match = _LINE.fullmatch(line)
    return match.group(1) if match else None


def _commented(line: str) -> str | None:
    match = _COMMENTED.match(line)
    return match.group(1) if match else None


def template(state: Path) -> str:
    """A new configuration file: every setting documented, each at its default,
    commented out."""
    out = [HEADER]
    group = ""
    for entry in ENTRIES:
        if entry.group != group:
            group = entry.group
            out.append(f"\n# ==== {GROUPS[group]}\n")
        out.append(_documented(entry, state))
    return "".join(out)


def _documented(entry: Entry, state: Path) -> str:
    flag = f" ({entry.flag} {entry.metavar})" if entry.flag else ""
    text = f"{entry.key}{flag}: {entry.help}."
    comment = textwrap.fill(text, 88, initial_indent="# ", subsequent_indent="#   ")
    return f"\n{comment}\n#{entry.key}={quote(entry.default_for(state))}\n"
