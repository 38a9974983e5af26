"""The pool's scoreboard: one small shared-memory slot per worker, in a folder.

Each worker maps its own file ``<pid>.slot`` and rewrites it as requests start
and end (and its deferred counters change), so whichever worker answers the
status page reads every slot and reports the whole pool, as PHP-FPM does.
Slots of workers that are gone are skipped and removed. ``pool.json`` keeps
what outlives one worker: the pool's start and its high-water marks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

FIELDS = (
    ("pid", "i"),
    ("start_time", "d"),
    ("accepted", "Q"),
    ("requests", "Q"),
    ("busy_since", "d"),  # 0 when idle
    ("last_duration", "d"),
    ("method", "8s"),
    ("uri", "200s"),
    ("content_length", "q"),
    ("slow", "Q"),
    ("deferred_queued", "Q"),
    ("deferred_running", "Q"),
    ("deferred_done", "Q"),
    ("deferred_failed", "Q"),
    ("deferred_abandoned", "Q"),
    ("last_deferred", "d"),
    ("deferred_journal_pending", "Q"),  # journal-wide (every worker sees the same file)
    ("deferred_journal_dead", "Q"),
)
SLOT = struct.Struct("<" + "".join(fmt for _, fmt in FIELDS))
NAMES = [name for name, _ in FIELDS]
# the deferred-work hook's keys kept in a slot (the journal's only when it is on)
COUNTERS = ("queued", "running", "done", "failed", "abandoned", "journal_pending", "journal_dead")
_TEXT = {"method", "uri"}


class Scoreboard:
    """This worker's slot, and reading everyone's."""

    def __init__(self, directory: str | Path, private: bool = False) -> None:
        self.private = private  # ours alone: removed with the worker
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{os.getpid()}.slot"
        if not [s for s in self.read_all(sample=False) if s["pid"] != os.getpid()]:
            # the first worker of a new pool: its start time and marks begin now
            with contextlib.suppress(FileNotFoundError):
                (self.dir / "pool.json").unlink()
        with open(self.path, "wb") as f:
            f.write(bytes(SLOT.size))
        self._file = open(self.path, "r+b")  # noqa: SIM115 - closed in close()
        self._map = mmap.mmap(self._file.fileno(), SLOT.size)
        self.values: dict[str, Any] = dict.fromkeys(NAMES, 0)
        self.values.update(pid=os.getpid(), start_time=time.time(), method=b"", uri=b"")
        self._write()
        self._update_pool(active=0)

    def _write(self) -> None:
        SLOT.pack_into(self._map, 0, *self.values.values())

    def accepted(self) -> None:
        self.values["accepted"] += 1
        self._write()

    def request_started(self, method: str, uri: str, content_length: str) -> None:
        v = self.values
        v["busy_since"] = time.time()
        v["method"] = method.encode("latin-1")[:8]
        v["uri"] = uri.encode("latin-1")[:200]
        v["content_length"] = int(content_length) if content_length.isdigit() else 0
        self._write()

    def request_ended(self) -> None:
        v = self.values
        v["requests"] += 1
        v["last_duration"] = time.time() - v["busy_since"]
        v["busy_since"] = 0.0
        self._write()

    def set_counters(self, slow: int, deferred: dict[str, Any] | None) -> None:
        v = self.values
        v["slow"] = slow
        if deferred:
            for key in COUNTERS:
                v["deferred_" + key] = deferred.get(key, 0)
            v["last_deferred"] = deferred.get("last_duration", 0.0)
        self._write()

    def close(self) -> None:
        self._map.close()
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.private:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- reading the pool ------------------------------------------------------------

    def read_all(self, sample: bool = True) -> list[dict[str, Any]]:
        """Every live worker's slot; the slots of dead workers are removed. With ``sample``,
        the pool's high-water marks take in how many are busy now."""
        slots = []
        for path in sorted(self.dir.glob("*.slot")):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if len(data) != SLOT.size:
                continue
            slot = dict(zip(NAMES, SLOT.unpack(data), strict=True))
            if not _alive(slot["pid"]):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            for key in _TEXT:
                slot[key] = slot[key].rstrip(b"\0").decode("latin-1")
            slots.append(slot)
        if sample:
            self._update_pool(active=sum(1 for s in slots if s["busy_since"]), total=len(slots))
        return slots

    def pool(self) -> dict[str, Any]:
        return self._update_pool()

    def _update_pool(self, active: int = 0, total: int = 0) -> dict[str, Any]:
        """Read and update pool.json under a lock: start time and high-water marks."""
        path = self.dir / "pool.json"
        with open(path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            try:
                pool = json.loads(f.read() or "{}")
            except ValueError:
                pool = {}
            pool.setdefault("start_time", time.time())
            pool["max_active"] = max(pool.get("max_active", 0), active)
            if total and active >= total:
                pool["max_children_reached"] = pool.get("max_children_reached", 0) + 1
            pool.setdefault("max_children_reached", 0)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(pool))
        return pool


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
