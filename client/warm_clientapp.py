"""Fork server for ``flwr-clientapp`` processes (``client.superexec``).

It imports Flower's ClientApp runtime once, then reads lines from stdin, each the JSON
list of ``flwr-clientapp`` arguments for one task. For each it forks: the child runs
Flower's ``flwr-clientapp`` code with those arguments, exactly as a fresh
``flwr-clientapp`` process would (it loads the run's app from the FAB: this process
imports Flower only, never the app), and exits with its exit code. Forking a process
that has imported Flower costs milliseconds instead of the import's ~1.7 s of CPU.
End of input (the SuperExec stopped) ends the fork server; running tasks go on.
The server starts no thread and opens no connection before forking.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable


def run_task(args: list[str]) -> int:
    """Flower's ``flwr-clientapp`` with ``args``, in this (forked) process."""
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = ["flwr-clientapp", *args]
    t0 = time.perf_counter()
    code: int = 0
    try:
        flwr_clientapp()
    except SystemExit as err:  # flwr_exit ends the task this way
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    if os.environ.get("FEDSTREAM_PROFILE_CLIENTAPP"):
        print(
            f"{_now()} clientapp task process {os.getpid()}: "
            f"{time.perf_counter() - t0:.2f} s wall, "
            f"{time.process_time():.2f} s CPU, exit {code}",
            file=sys.stderr,
            flush=True,
        )
    return code


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _fork(args: list[str], run: Callable[[list[str]], int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the tasks' pipe (and what is buffered of it) is the
        sys.stdin = open(os.devnull)  # server's, never the task's  # noqa: SIM115
        code = run(args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(lines: Iterable[str], run: Callable[[list[str]], int] = run_task) -> None:
    """Fork ``run(args)`` for each line of ``lines`` until they end."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped for us
    print(f"clientapp fork server {os.getpid()} ready", file=sys.stderr, flush=True)
    for line in lines:
        if not line.strip():
            continue
        try:
            args = json.loads(line)
        except json.JSONDecodeError:
            args = None
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            print("clientapp fork server: bad task line ignored", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        pid = _fork(args, run)
        print(
            f"{_now()} clientapp fork server: task process {pid} started in "
            f"{(time.perf_counter() - t0) * 1000:.0f} ms",
            file=sys.stderr,
            flush=True,
        )


def main() -> None:
    from flwr.supernode.cli import flwr_clientapp  # noqa: F401  (the point)

    serve(sys.stdin)


if __name__ == "__main__":
    main()
