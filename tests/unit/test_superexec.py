"""ClientApp processes forked from a server that imported Flower once
(``client.warm_clientapp``), and the SuperExec executor that feeds it
(``client.superexec``): real processes, real pipes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

from client import superexec, supernode
from tests.conftest import ROOT


def _spec(token: str = "secret-token", task_type=TaskType.CLIENT_APP) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:9094",
        token=token,
        insecure=False,
        root_certificates_path="/certs/ca.crt",
        runtime_dependency_install=False,
        parent_pid=4242,
        suppress_output=False,
        task_id=7,
    )


def _wait(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _recording_server(tmp_path: Path) -> list[str]:
    """The real fork server loop; each forked child writes its pid and arguments."""
    code = (
        "import json, os, sys\n"
        "from client.warm_clientapp import serve\n"
        f"out = {str(tmp_path)!r}\n"
        "def run(args):\n"
        "    path = os.path.join(out, f'task-{os.getpid()}.json')\n"
        "    with open(path, 'w') as fh:\n"
        "        json.dump({'args': args, 'ppid': os.getppid(),\n"
        "                   'stdin': sys.stdin.read()}, fh)\n"
        "    return 3 if args == ['fail'] else 0\n"
        "serve(sys.stdin, run)\n"
    )
    return [sys.executable, "-c", code]


def _tasks(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("task-*.json"))]


def test_clientapp_arguments_are_what_flowers_executor_passes() -> None:
    args = superexec.clientapp_args(_spec())
    assert args == [
        "--runtime-api-address",
        "127.0.0.1:9094",
        "--token",
        "secret-token",
        "--root-certificates",
        "/certs/ca.crt",
        "--parent-pid",
        "4242",
    ]


def test_fork_server_forks_one_child_per_task_line(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        _recording_server(tmp_path),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(json.dumps(["--token", "a"]) + "\n")
    proc.stdin.write("not json\n")  # ignored, the server goes on
    proc.stdin.write(json.dumps({"token": "b"}) + "\n")  # not a list: ignored
    proc.stdin.write(json.dumps(["fail"]) + "\n")
    proc.stdin.flush()
    _wait(lambda: len(_tasks(tmp_path)) == 2)
    proc.stdin.close()  # end of input: the server exits
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read()
    assert err.count("bad task line ignored") == 2
    assert err.count("task process") == 2
    tasks = _tasks(tmp_path)
    assert sorted(t["args"] for t in tasks) == [["--token", "a"], ["fail"]]
    for t in tasks:
        assert t["ppid"] == proc.pid  # forked by the server
        assert t["stdin"] == ""  # the children never read the task pipe


def test_executor_hands_tasks_to_the_fork_server_and_replaces_a_dead_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    ex = superexec.WarmClientAppExecutor(_recording_server(tmp_path))
    try:
        assert ex.launch(_spec("t1")).status == "accepted"
        assert ex.launch(_spec("t2")).status == "accepted"
        _wait(lambda: len(_tasks(tmp_path)) == 2)
        tokens = sorted(
            t["args"][t["args"].index("--token") + 1] for t in _tasks(tmp_path)
        )
        assert tokens == ["t1", "t2"] and ex.warm_launches == 2
        first = ex._server
        assert first is not None
        first.kill()
        first.wait()
        ex.reconcile()  # the SuperExec loop calls this before each poll
        assert ex._server is not None and ex._server is not first
        assert ex.launch(_spec("t3")).status == "accepted"
        _wait(lambda: len(_tasks(tmp_path)) == 3)
        assert ex.cold_launches == 0
    finally:
        ex.close()
    assert ex._server is None


def test_executor_starts_the_task_the_ordinary_way_without_a_fork_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    ordinary: list[ExecutionSpec] = []
    monkeypatch.setattr(
        SubprocessExecutor,
        "launch",
        lambda self, spec: ordinary.append(spec) or superexec.LaunchResult.accepted(),
    )
    ex = superexec.WarmClientAppExecutor(_recording_server(tmp_path))
    try:
        assert ex._server is not None
        ex._server.kill()
        ex._server.wait()
        assert ex.launch(_spec("t1")).status == "accepted"
        assert [s.token for s in ordinary] == ["t1"] and ex.cold_launches == 1
        assert ex._server is not None and ex._server.poll() is None  # a new one
        ex.launch(_spec("t2", task_type=TaskType.SERVER_APP))  # not a ClientApp
        assert [s.token for s in ordinary] == ["t1", "t2"]
        assert ex.launch(_spec("t3")).status == "accepted"
        _wait(lambda: len(_tasks(tmp_path)) == 1)
    finally:
        ex.close()


def test_supernode_starts_our_superexec_in_place_of_flowers() -> None:
    import inspect

    from flwr.supernode import start_client_internal as sci

    assert 'command = ["flower-superexec"]' in inspect.getsource(sci)
    original = sci.subprocess
    try:
        supernode.patch_superexec()
        seen: list[list[str]] = []

        class Recorder:
            def Popen(self, args, *a, **k):
                seen.append(args)

        sci.subprocess._module = Recorder()  # type: ignore[union-attr]
        sci.subprocess.Popen(["flower-superexec", "--runtime-api-address", "x"])
        sci.subprocess.Popen(["something-else"])
        assert seen == [
            [sys.executable, "-m", "client.superexec", "--runtime-api-address", "x"],
            ["something-else"],
        ]
    finally:
        sci.subprocess = original


def test_superexec_patch_makes_flower_use_the_warm_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as rs

    monkeypatch.setattr(rs, "get_executor", rs.get_executor)  # restored after
    made: list[object] = []
    monkeypatch.setattr(
        superexec.WarmClientAppExecutor, "__init__", lambda self: made.append(self)
    )
    superexec.patch()
    ex = rs.get_executor(ExecutorType.SUBPROCESS)
    assert isinstance(ex, superexec.WarmClientAppExecutor) and made == [ex]


def test_superexec_and_its_fork_server_exit_when_their_supernode_is_gone(
    tmp_path: Path,
) -> None:
    """A SuperExec whose SuperNode died (here: a stand-in parent that exits at once)
    does not retry a dead runtime API forever, and takes its fork server along."""
    from tests.integration.agent_util import free_port

    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    log = (tmp_path / "superexec.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "client.superexec",
            "--insecure",
            "--runtime-api-address",
            f"127.0.0.1:{free_port()}",  # nobody listens: Flower retries it
            "--parent-pid",
            str(parent.pid),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    try:
        _wait(lambda: "fork server" in (tmp_path / "superexec.log").read_text(), 60)
        server = int(
            (tmp_path / "superexec.log").read_text().split("fork server ")[1].split()[0]
        )
        parent.wait(timeout=30)
        assert proc.wait(timeout=60) is not None
        _wait(lambda: not Path(f"/proc/{server}").exists(), 30)
    finally:
        for p in (proc, parent):
            if p.poll() is None:
                p.kill()
                p.wait()
