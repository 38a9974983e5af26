"""--cpu-affinity: a worker and all its threads on one CPU; what it starts on all of them;
deferred work as background threads that never preempt the serving one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.fcgi_client import Client
from tests.procs import python_env, run_fcgi, wait_for, worker

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
        tids = threads(proc.pid)
        assert len(tids) > 1, "the worker should have started threads of its own"
        mine = {tuple(cpus(proc.pid, tid)) for tid in tids}
        assert mine == {(ALL[proc.pid % len(ALL)],)}


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
        assert cpus(int(helper[0])) == ALL


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
        text = wait_for(lambda: out.read_text().count("\n") >= 3 and out.read_text(), 20)
    imports = [line.split() for line in text.splitlines()]
    checks = [cpus for pid, cpus in imports if int(pid) != proc.pid]
    assert checks == [",".join(map(str, ALL))]
