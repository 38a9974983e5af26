"""--cpu-affinity: a worker and all its threads on one CPU; what it starts on all of them;
deferred work as background threads that never preempt the serving one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.fcgi_client import Client
from tests.procs import lines, python_env, run_fcgi, stack, wait_for, worker

ALL = sorted(os.sched_getaffinity(0))


def cpus(pid: int, tid: int | None = None) -> list[int]:
    """The CPUs a process (or one of its threads) may run on, from /proc."""
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    for line in Path(path).read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse(line.split(":", 1)[1])
    raise AssertionError(f"no Cpus_allowed_list in {path}")


def parse(text: str) -> list[int]:
    found: list[int] = []
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        found += range(int(low), int(high or low) + 1)
    return found


def threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


def test_by_default_every_thread_of_the_worker_shares_one_cpu(tmp_path: Path) -> None:
    out = tmp_path / "cpus.txt"
    with worker(tmp_path, "tests.apps:affinity_probe") as (proc, sock):
        client = Client(str(sock))
        assert client.request(f"/command?out={out}").status == 200  # deferred: threads
        client.close()
        wait_for(lambda: out.exists() and out.read_text().strip(), what="the command's output")
        assert len(threads(proc.pid)) > 1, "the worker should have started threads of its own"

        def shared() -> set[tuple[int, ...]]:
            return {tuple(cpus(proc.pid, tid)) for tid in threads(proc.pid)}

        # the thread that started the command had every CPU for the start, and goes back
        # once Popen returns, which may be after the command wrote its output
        wait_for(lambda: len(shared()) == 1, what=f"every thread on one CPU set: {shared()}")
        assert len(shared().pop()) == 1, "every thread on the same one CPU"


def test_a_number_picks_that_cpu_modulo_and_off_leaves_the_worker_free(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "off").mkdir()
    with worker(tmp_path / "one", "tests.apps:hello", "--cpu-affinity", "3") as (proc, _):
        assert cpus(proc.pid) == [ALL[3 % len(ALL)]]
    with worker(tmp_path / "off", "tests.apps:hello", "--cpu-affinity", "off") as (proc, _):
        assert cpus(proc.pid) == ALL


def test_a_command_after_the_response_may_use_every_cpu(tmp_path: Path) -> None:
    out = tmp_path / "cpus.txt"
    with worker(tmp_path, "tests.apps:affinity_probe", "--cpu-affinity", "0") as (proc, sock):
        assert cpus(proc.pid) == [ALL[0]]
        client = Client(str(sock))
        assert client.request(f"/command?out={out}").status == 200
        client.close()
        wait_for(lambda: out.exists() and out.read_text().strip(), what="the command's output")
    assert parse(out.read_text().split(":", 1)[1]) == ALL


def test_the_deferred_helper_process_may_use_every_cpu(tmp_path: Path) -> None:
    with worker(tmp_path, "tests.apps_executor:helper", "--cpu-affinity", "0") as (
        proc,
        sock,
    ):
        client = Client(str(sock))
        assert client.request("/work?n=1&s=0").status == 200
        client.close()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        helper = wait_for(lambda: children.read_text().split(), what="the helper process")
        assert cpus(proc.pid) == [ALL[0]]
        # the helper widens its CPUs itself, as it starts
        wait_for(lambda: cpus(int(helper[0])) == ALL, what="the helper on every CPU")


def test_a_bad_value_is_refused_with_the_option_named() -> None:
    done = run_fcgi("--cpu-affinity", "half", "tests.apps:hello")
    assert done.returncode == 2
    assert "--cpu-affinity" in done.stderr and "auto, off or a CPU index" in done.stderr


def test_deferred_work_runs_as_background_threads_and_serving_does_not(tmp_path: Path) -> None:
    out = tmp_path / "policy.txt"
    for threads in ("1", "4"):
        out.unlink(missing_ok=True)
        with worker(tmp_path, "tests.apps:policy_probe", "--threads", threads) as (_, sock):
            client = Client(str(sock))
            assert client.request(f"/?out={out}").status == 200
            client.close()
            lines = wait_for(
                lambda: out.read_text().count("\n") == 3 and out.read_text(), what="three lines"
            )
        policies = dict(line.split() for line in lines.splitlines())
        assert policies == {
            "serving": str(os.SCHED_OTHER),
            "plain": str(os.SCHED_BATCH),
            "coroutine": str(os.SCHED_BATCH),
        }, f"--threads {threads}"


PROBE_APP = """
import os
with open(os.environ["CPU_PROBE_OUT"], "a") as f:
    f.write(f"{os.getpid()} {','.join(map(str, sorted(os.sched_getaffinity(0))))}\\n")

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


def test_a_reloads_import_check_may_use_every_cpu(tmp_path: Path) -> None:
    out = tmp_path / "imports.txt"
    (tmp_path / "cpu_probe_app.py").write_text(PROBE_APP)
    args = ("--cpu-affinity", "0", "--pythonpath", str(tmp_path))
    env = python_env(CPU_PROBE_OUT=str(out))
    with worker(tmp_path, "cpu_probe_app:app", *args, env=env) as (proc, _):
        proc.send_signal(signal.SIGHUP)  # reload: the check imports the app in a child
        wait_for(lambda: len(lines(out)) >= 3, 20, "the worker's imports and the check's")
    imports = [line.split() for line in lines(out)]
    checks = [cpus for pid, cpus in imports if int(pid) != proc.pid]
    assert checks == [",".join(map(str, ALL))]


def _pool_pids(ctl) -> dict[str, int]:
    """The pool's running workers by name, from supervisorctl."""
    found = {}
    for line in ctl("status").splitlines():
        name, state, *rest = line.split()
        if name.startswith("app:") and state == "RUNNING":
            found[name] = int(rest[1].rstrip(","))
    return found


@pytest.mark.e2e
@pytest.mark.slow
def test_auto_never_puts_two_workers_of_a_pool_on_one_cpu(tmp_path: Path) -> None:
    """The shipped supervisord pool with --cpu-affinity auto (what a supervisor config of
    one's own gets by default): the second worker restarted eight times lands beside the
    first, never on its CPU; a reload in place keeps the worker's CPU claimed, so a
    restarted neighbour still goes elsewhere."""
    assert len(ALL) >= 2, "this test needs a machine with two CPUs or more"
    with stack(tmp_path, numprocs=2, FCGI_CPU_AFFINITY="auto") as (_, ctl):
        seen = []

        def placed() -> tuple[int, int]:
            pids = wait_for(lambda: len(p := _pool_pids(ctl)) == 2 and p, 30, "two workers")
            first, second = (cpus(pids[f"app:app_0{i}"]) for i in (0, 1))
            assert len(first) == 1 and len(second) == 1, (first, second)
            assert first != second, f"both workers on CPU {first}: {seen}"
            seen.append((pids["app:app_01"], second[0]))
            return pids["app:app_00"], pids["app:app_01"]

        placed()
        for _ in range(8):
            assert "started" in ctl("restart", "app:app_01")
            placed()
        assert len({pid for pid, _ in seen}) == 9, "each restart is a new process"

        # a reload in place (same pid): the new interpreter keeps the CPU's lock
        _, second = placed()
        log = tmp_path / "var" / "log" / "app_01.log"
        served = log.read_text().count("serving on")
        os.kill(second, signal.SIGHUP)
        wait_for(lambda: log.read_text().count("serving on") > served, 60, "the reload")
        kept = cpus(second)
        assert "started" in ctl("restart", "app:app_00")
        _, again = placed()
        assert again == second and cpus(second) == kept


def test_auto_binds_nothing_when_the_pool_folder_is_unusable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ("--cpu-affinity", "auto", "--scoreboard", str(blocker / "pool"))
    log = tmp_path / "app.log"
    with worker(tmp_path, "tests.apps:hello", *args) as (proc, _):
        # the socket is there before the worker binds: it has chosen once it serves
        wait_for(lambda: "serving on" in log.read_text(), 30, "the worker to serve")
        assert cpus(proc.pid) == ALL
    assert "not bound to a CPU" in log.read_text()


def test_a_kept_lock_of_a_cpu_no_longer_allowed_is_given_up(tmp_path: Path) -> None:
    """After a reload into a narrower cpuset, the lock of the CPU it held is closed, not
    held for nothing by a worker that cannot run there (and claims another)."""
    import fcntl

    from fcgi import affinity

    fd = os.open(tmp_path / "cpu7.0.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.environ[affinity.LOCK_ENV] = f"{fd}:7:{os.fstat(fd).st_ino}"
    try:
        assert affinity._kept_lock([0, 1]) is None
        with pytest.raises(OSError):
            os.fstat(fd)  # closed, and the lock with it
    finally:
        os.environ.pop(affinity.LOCK_ENV, None)
