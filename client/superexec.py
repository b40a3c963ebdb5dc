"""Flower's ``flower-superexec`` whose ClientApp processes are forked, not started.

For every message, Flower 1.42's SuperExec starts a new ``flwr-clientapp`` process,
which imports Flower (about 1.7 s of CPU here) before it even asks for its task; with
several hosts on one machine, or the four exchanges of a SecAgg+ round, those starts
are most of a round's overhead. ``WarmClientAppExecutor`` keeps one fork server
(``client.warm_clientapp``) that has imported Flower once; each ClientApp task is
written to its stdin (the arguments ``flwr-clientapp`` gets, token included, over the
pipe rather than a command line) and it forks a child that runs Flower's own
``flwr-clientapp`` code with them: one process per task as before, which loads the
run's app from its FAB (the fork server imports Flower only, never the app). If the
fork server is not running, the task is started the ordinary way and a new fork
server is started.

    python -m client.superexec <flower-superexec arguments>
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time

from flwr.supercore.constant import (
    TASK_TYPE_TO_APPIO_API_ADDRESS_ARG,
    ExecutorType,
    TaskType,
)
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

__all__ = ["WarmClientAppExecutor", "clientapp_args", "main", "patch"]

log = logging.getLogger(__name__)

FORK_SERVER = [sys.executable, "-m", "client.warm_clientapp"]


def clientapp_args(spec: ExecutionSpec) -> list[str]:
    """What Flower's SubprocessExecutor passes to ``flwr-clientapp``."""
    args = [
        TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
        spec.runtime_api_address,
        "--token",
        spec.token,
    ]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args.extend(["--root-certificates", spec.root_certificates_path])
    if spec.parent_pid is not None:
        args.extend(["--parent-pid", str(spec.parent_pid)])
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


class WarmClientAppExecutor(SubprocessExecutor):
    def __init__(self, server: list[str] | None = None) -> None:
        self.server_command = server or FORK_SERVER
        self.warm_launches = 0
        self.cold_launches = 0
        self._server: subprocess.Popen[bytes] | None = None
        self._spawn()

    def _spawn(self) -> None:
        try:
            self._server = subprocess.Popen(self.server_command, stdin=subprocess.PIPE)
        except OSError as err:  # the ordinary start still works
            log.warning("no ClientApp fork server: %s", err)
            self._server = None

    def _hand_over(self, spec: ExecutionSpec) -> bool:
        proc = self._server
        if proc is None or proc.poll() is not None or proc.stdin is None:
            return False
        try:
            proc.stdin.write(json.dumps(clientapp_args(spec)).encode() + b"\n")
            proc.stdin.flush()
        except OSError:  # it died meanwhile
            return False
        return True

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        if self._hand_over(spec):
            self.warm_launches += 1
            return LaunchResult.accepted()
        self.cold_launches += 1
        log.warning("ClientApp task %d started without the fork server", spec.task_id)
        self.close()
        self._spawn()  # for the next task
        return super().launch(spec)

    def reconcile(self) -> None:
        """Called by the SuperExec loop before each poll."""
        if self._server is not None and self._server.poll() is not None:
            log.warning("ClientApp fork server exited (%s)", self._server.returncode)
            self._spawn()

    def close(self) -> None:
        proc, self._server = self._server, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # end of input: the server exits, tasks go on
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def patch() -> None:
    """Make Flower's SuperExec use ``WarmClientAppExecutor`` for local processes."""
    from flwr.supercore.superexec import run_superexec as rs

    flower_get_executor = rs.get_executor

    def get_executor(executor_type, *args, **kwargs):  # type: ignore[no-untyped-def]
        if executor_type == ExecutorType.SUBPROCESS:
            return WarmClientAppExecutor()
        return flower_get_executor(executor_type, *args, **kwargs)

    rs.get_executor = get_executor  # type: ignore[assignment]


ORPHAN_GRACE_S = 5.0


def exit_when_orphaned(parent_pid: int, grace_s: float = ORPHAN_GRACE_S) -> None:
    """Exit once ``parent_pid`` (the SuperNode) is gone and Flower's own monitor has
    not ended this process within ``grace_s``: Flower's raises SIGINT once, which is
    lost when it lands during an import, leaving a SuperExec that retries its dead
    SuperNode forever (seen when a SuperNode exits while starting)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:  # it exists, owned by someone else
                continue
        time.sleep(grace_s)
        log.warning("SuperNode %d is gone: SuperExec exits", parent_pid)
        os._exit(0)  # the fork server sees end of input and exits too

    threading.Thread(target=watch, name="orphan-guard", daemon=True).start()


def _parent_pid(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg == "--parent-pid" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--parent-pid="):
            return int(arg.split("=", 1)[1])
    return None


def main() -> None:
    parent = _parent_pid(sys.argv[1:])
    if parent is not None:
        exit_when_orphaned(parent)
    patch()
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *sys.argv[1:]]
    flower_superexec()


if __name__ == "__main__":
    main()
