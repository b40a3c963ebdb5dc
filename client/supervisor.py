"""Supervision of the data host's ``flower-supernode`` and training worker.

The SuperNode is Flower's, started through ``client.supernode`` so that its idle poll
is ``supernode.poll_interval`` instead of 3 s.

The SuperNode connects to the SuperLink with TLS and this host's authentication key,
and hands the host's data dir to the ClientApp in ``node_config["data-dir"]``. If it
exits (crash, rejected key, SuperLink gone for longer than Flower retries), it is
started again after a backoff that doubles up to 30 s and resets once a run of it
lasted a minute. ``stop()`` terminates it: a reply that is not complete is never sent,
because Flower sends a reply only once the ClientApp has returned it whole.

The training worker (``client.worker``, ``supernode.worker``) is supervised the same
way; while it is down, the ClientApp trains in its own process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common.agent_config import SupernodeSettings

__all__ = [
    "ProcessSupervisor",
    "SupernodeSupervisor",
    "supernode_command",
    "worker_command",
]

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
STABLE_S = 60.0


def _node_config(values: dict[str, str | int | float | bool]) -> str:
    """Flower's ``--node-config`` syntax: space-separated TOML ``key=value`` pairs."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a TOML basic string
        else:
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_command(settings: SupernodeSettings, data_dir: Path) -> list[str]:
    node_config = {**settings.node_config, "data-dir": str(data_dir.resolve())}
    cmd = [
        sys.executable,
        "-m",
        "client.supernode",  # Flower's flower-supernode, with its sleeps capped
        "--poll-interval",
        repr(settings.poll_interval),
        *(["--warm-clientapp"] if settings.warm_clientapp else []),
        "--superlink",
        settings.superlink,
        "--node-config",
        _node_config(node_config),
        "--port",
        str(settings.runtime_port),
    ]
    if settings.insecure:
        return [*cmd, "--insecure"]
    assert settings.root_certificates and settings.auth_key
    return [
        *cmd,
        "--root-certificates",
        settings.root_certificates,
        "--auth-supernode-private-key",
        settings.auth_key,
    ]


def worker_command(data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "client.worker",
        "--data-dir",
        str(data_dir.resolve()),
    ]


class ProcessSupervisor:
    """Runs ``command`` in a thread of the agent and restarts it when it exits."""

    def __init__(
        self,
        name: str,
        command: list[str],
        data_dir: Path,
        *,
        restart_backoff_s: float,
        ready: Callable[[], bool] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.restart_backoff_s = restart_backoff_s
        self.data_dir = data_dir
        self.ready = ready or (lambda: True)
        self.log_path = log_path or data_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {
            # SuperExec (started by the SuperNode) looks for a message to run every
            # second by default; each round waits for that up to four times
            # (train, and the three SecAgg+ exchanges).
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            **os.environ,
            # Hosts run with dependencies preinstalled: never uv-install per run.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        fh = self.log_path.open("ab")
        try:
            return subprocess.Popen(
                self.command,
                env=env,
                stdout=fh,
                stderr=fh,
                cwd=self.data_dir,
            )
        finally:
            fh.close()

    def _loop(self) -> None:
        while not self.ready():
            if self._stop.wait(0.5):
                return
        backoff = self.restart_backoff_s
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    return
                self.proc = self._spawn()
                self.starts += 1
            log.info(
                "%s started (pid %d, start %d)",
                self.name,
                self.proc.pid,
                self.starts,
            )
            began = time.monotonic()
            code = self.proc.wait()
            if self._stop.is_set():
                return
            if time.monotonic() - began > STABLE_S:
                backoff = self.restart_backoff_s
            log.warning(
                "%s exited with %s; restarting in %.1f s (see %s)",
                self.name,
                code,
                backoff,
                self.log_path,
            )
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def stop(self, timeout: float = 20.0) -> None:
        with self._lock:
            self._stop.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)


class SupernodeSupervisor(ProcessSupervisor):
    """The agent's ``flower-supernode``, restarted when it exits."""

    def __init__(
        self,
        settings: SupernodeSettings,
        data_dir: Path,
        *,
        ready: Callable[[], bool] | None = None,
        log_path: Path | None = None,
    ) -> None:
        super().__init__(
            "supernode",
            supernode_command(settings, data_dir),
            data_dir,
            restart_backoff_s=settings.restart_backoff_s,
            ready=ready,
            log_path=log_path,
        )
        self.settings = settings
