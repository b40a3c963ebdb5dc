"""The server launcher: a SuperLink with TLS and SuperNode authentication, and the run.

``launch(cfg)`` starts ``flower-superlink`` (its state in ``<state_dir>/superlink.db``),
registers every authorized SuperNode public key, and submits the fedstream ServerApp
with ``flwr run`` (its own Flower home in ``<state_dir>/flwr-home``, so the operator's
``~/.flwr`` is never touched). The run folder is the resume point: after a crash or a
restart, ``launch`` submits the run again and the ServerApp continues after the last
complete round (``server.checkpoint.RunFolder``).

The submitted run carries the whole validated run config in ``deploy.config`` and
``deploy.hosts = "nodes"``: deployed hosts bring their own data dirs (node_config).

With ``keep_serving`` the SuperLink stays up after the run completes, until SIGTERM,
so that more runs can be submitted to it (``flwr run . fedstream`` with
``FLWR_HOME=<state_dir>/flwr-home``, whose connection ``fedstream`` is this one).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

from common.errors import ConfigError, FedstreamError
from common.server_config import ServerConfig, split_address
from server.checkpoint import RunFolder

__all__ = [
    "CONNECTION",
    "Launcher",
    "app_dir",
    "launch",
    "register_keys",
    "status",
    "write_flwr_home",
]

log = logging.getLogger(__name__)

CONNECTION = "fedstream"  # the SuperLink connection name in our Flower home
INSECURE_WARNING = (
    "WARNING: --insecure: plain HTTP and no SuperNode authentication; "
    "for local development only"
)


def _bin(name: str) -> str:
    """A console script of this Python environment (PATH as a fallback)."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def app_dir(cfg: ServerConfig) -> Path:
    if cfg.server.app_dir:
        return cfg.path(cfg.server.app_dir)
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise ConfigError(
            f"server.app_dir is unset and {root} has no pyproject.toml; set "
            "server.app_dir to the fedstream source folder (the Flower App)"
        )
    return root


def client_address(listen: str) -> str:
    host, port = split_address(listen, field="server.listen")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def flwr_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def write_flwr_home(
    home: Path, address: str, *, ca: Path | None, insecure: bool
) -> None:
    """A Flower home whose default SuperLink connection is ours."""
    conn: dict[str, Any] = {"address": address}
    if insecure:
        conn["insecure"] = True
    else:
        assert ca is not None
        conn["root-certificates"] = str(ca.resolve())
    home.mkdir(parents=True, exist_ok=True)
    text = tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})
    (home / "config.toml").write_text(text)


def host_name_of(key: Path) -> str:
    """The host a public key belongs to: ``hosts/<name>/auth.pub`` (as
    ``fedstream-server certs`` writes them) gives ``name``, another file its stem."""
    return key.parent.name if key.name == "auth.pub" else key.stem


def register_keys(
    home: Path, keys: list[Path], names: dict[str, str] | None = None
) -> dict[str, str]:
    """Register SuperNode public keys; a key registered before is fine.

    One ``flwr supernode register`` per key, run concurrently (each is a Python
    start-up: with many hosts, one after the other would delay every (re)start).
    ``names`` (node id -> host name) gets the node id of each newly registered key.
    """
    for key in keys:
        if not key.exists():
            raise ConfigError(f"server.authorized_keys: {key} does not exist")

    def one(key: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_bin("flwr"), "supernode", "register", str(key), CONNECTION],
            env=flwr_env(home),
            capture_output=True,
            text=True,
            timeout=60,
        )

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(keys)))) as pool:
        procs = list(pool.map(one, keys))
    result: dict[str, str] = {}
    for key, proc in zip(keys, procs, strict=True):
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 and "registered successfully" in out:
            result[str(key)] = "registered"
            found = re.search(r"SuperNode (\d+) registered successfully", out)
            if found and names is not None:
                names[found.group(1)] = host_name_of(key)
        elif "already in use" in out:
            result[str(key)] = "known"
        else:
            tail = out.strip().splitlines()[-1:] or ["no output"]
            raise FedstreamError(f"registering {key} failed: {tail[0]}")
    return result


def wait_listening(address: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    host, port = split_address(address, field="server.listen")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedstreamError(
                f"flower-superlink exited with {proc.returncode} at start; "
                "see its log in the state dir"
            )
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise FedstreamError(f"flower-superlink did not listen on {address} in {timeout}s")


@dataclass
class Launcher:
    """The processes of one ``fedstream-server run``."""

    cfg: ServerConfig
    insecure: bool = False
    out: IO[str] = sys.stdout
    keep_serving: bool = False

    def __post_init__(self) -> None:
        s = self.cfg.server
        self.insecure = self.insecure or s.insecure
        if self.insecure and s.production:
            raise ConfigError(
                "--insecure is refused because server.production = true; set "
                "server.production = false for local development"
            )
        self.run_cfg = self.cfg.run_config()
        self.state = self.cfg.state_dir
        self.home = self.state / "flwr-home"
        self.address = client_address(s.listen)
        self.superlink: subprocess.Popen[bytes] | None = None
        self.flwr_run: subprocess.Popen[bytes] | None = None
        certs = self.cfg.certs_dir
        self.ca, self.cert, self.key = (
            certs / "ca.crt",
            certs / "superlink.crt",
            certs / "superlink.key",
        )
        if not self.insecure:
            for p in (self.ca, self.cert, self.key):
                if not p.exists():
                    raise ConfigError(
                        f"server.certs: {p} does not exist; create it with "
                        "fedstream-server certs --out DIR"
                    )

    def say(self, text: str) -> None:
        print(f"fedstream-server: {text}", file=self.out, flush=True)

    def superlink_command(self) -> list[str]:
        host, port = split_address(self.cfg.server.listen, field="server.listen")
        cmd = [
            _bin("flower-superlink"),
            "--host",
            host,
            "--port",
            str(port),
            "--database",
            str(self.state / "superlink.db"),
        ]
        if not self.cfg.server.install_dependencies:
            cmd.append("--disable-runtime-dependency-installation")
        if self.insecure:
            return [*cmd, "--insecure"]
        return [
            *cmd,
            "--ssl-ca-certfile",
            str(self.ca),
            "--ssl-certfile",
            str(self.cert),
            "--ssl-keyfile",
            str(self.key),
            "--enable-supernode-auth",
        ]

    def start_superlink(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        logf = (self.state / "superlink.log").open("ab")
        env = dict(os.environ)
        if not self.cfg.server.install_dependencies:
            env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        self.superlink = subprocess.Popen(
            self.superlink_command(), stdout=logf, stderr=logf, env=env
        )
        wait_listening(self.address, self.superlink, timeout=60)
        scheme = "http" if self.insecure else "https"
        self.say(f"SuperLink on {scheme}://{self.cfg.server.listen}")
        write_flwr_home(self.home, self.address, ca=self.ca, insecure=self.insecure)

    def register(self) -> None:
        if self.insecure:
            return
        keys = self.cfg.public_keys()
        if not keys:
            raise ConfigError(
                "no SuperNode public keys: set server.authorized_keys or create "
                "host keys with fedstream-server certs --host NAME"
            )
        path = self.state / "hosts.json"  # node id -> host name, for status
        names = json.loads(path.read_text()) if path.exists() else {}
        done = register_keys(self.home, keys, names)
        path.write_text(json.dumps(names, indent=1, sort_keys=True))
        new = sum(v == "registered" for v in done.values())
        self.say(f"{len(done)} host keys authorized ({new} new)")

    def submit(self) -> None:
        overrides = {
            "deploy.hosts": "nodes",
            "deploy.config": self.run_cfg.to_toml(),
        }
        path = self.state / "run-config.toml"
        path.write_text(tomli_w.dumps(overrides))
        logf = (self.state / "run.log").open("ab")
        self.flwr_run = subprocess.Popen(
            [
                _bin("flwr"),
                "run",
                str(app_dir(self.cfg)),
                CONNECTION,
                "--run-config",
                str(path),
                "--stream",
            ],
            env=flwr_env(self.home),
            stdout=logf,
            stderr=logf,
        )
        folder = RunFolder(self.run_cfg.out)
        self.say(
            f"run submitted: rounds {folder.last_round() + 1}.."
            f"{self.run_cfg.federation.rounds}, run folder {self.run_cfg.out}"
        )

    def wait(self, stop: threading.Event) -> int:
        """Report rounds as they complete; 0 when the last round is saved."""
        assert self.flwr_run is not None and self.superlink is not None
        folder = RunFolder(self.run_cfg.out)
        seen = folder.last_round()
        total = self.run_cfg.federation.rounds
        while not stop.wait(0.5):
            last = folder.last_round()
            if last > seen:
                seen = last
                self.say(f"round {last}/{total} saved")
            if self.superlink.poll() is not None:
                self.say(f"SuperLink exited with {self.superlink.returncode}")
                return 1
            if self.flwr_run.poll() is not None:
                if folder.last_round() >= total:
                    self.say(f"run complete: {folder.path}")
                    return self.serve(stop) if self.keep_serving else 0
                self.say(
                    f"run ended at round {folder.last_round()}/{total}; see "
                    f"{self.state / 'run.log'}; run again to resume"
                )
                return 1
        self.say("stopping")
        return 0

    def serve(self, stop: threading.Event) -> int:
        """Keep the SuperLink up for other runs until ``stop``."""
        assert self.superlink is not None
        self.say(
            f"SuperLink stays up for other runs (FLWR_HOME={self.home} flwr run . "
            f"{CONNECTION}); SIGTERM stops it"
        )
        while not stop.wait(0.5):
            if self.superlink.poll() is not None:
                self.say(f"SuperLink exited with {self.superlink.returncode}")
                return 1
        self.say("stopping")
        return 0

    def stop(self) -> None:
        for proc in (self.flwr_run, self.superlink):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def launch(
    cfg: ServerConfig,
    *,
    insecure: bool = False,
    keep_serving: bool = False,
    stop: threading.Event | None = None,
    out: IO[str] = sys.stdout,
) -> int:
    """``fedstream-server run``: until the run completes (with ``keep_serving``,
    until SIGTERM/SIGINT), or SIGTERM/SIGINT."""
    stop = stop or threading.Event()
    launcher = Launcher(cfg, insecure=insecure, out=out, keep_serving=keep_serving)
    if launcher.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)

    def _signal(signum: int, _frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
    try:
        launcher.start_superlink()
        launcher.register()
        folder, rounds = launcher.run_cfg.out, launcher.run_cfg.federation.rounds
        if RunFolder(folder).last_round() >= rounds:
            launcher.say(f"run folder {folder} is complete; nothing to do")
            return launcher.serve(stop) if keep_serving else 0
        launcher.submit()
        return launcher.wait(stop)
    finally:
        launcher.stop()


def connected_hosts(cfg: ServerConfig) -> list[dict[str, Any]] | None:
    """SuperNodes as the running SuperLink lists them; None if it is not reachable."""
    home = cfg.state_dir / "flwr-home"
    if not (home / "config.toml").exists():
        return None
    try:
        proc = subprocess.run(
            [_bin("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
            env=flwr_env(home),
            capture_output=True,
            text=True,
            timeout=30,
        )
        data = json.loads(proc.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not data.get("success"):
        return None
    nodes = data.get("nodes", [])
    return [n for n in nodes if isinstance(n, dict)]


def status(cfg: ServerConfig) -> dict[str, Any]:
    """Rounds, connected hosts (by host name where the launcher registered their
    keys, else by node id), last aggregate and epsilon per host."""
    run_cfg = cfg.run_config()
    folder = RunFolder(run_cfg.out)
    lines = folder.read_metrics() if folder.metrics_path.exists() else []
    last = lines[-1] if lines and lines[-1].get("round", 0) > 0 else None
    nodes = connected_hosts(cfg)
    path = cfg.state_dir / "hosts.json"
    names: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def name(node: str) -> str:
        return names.get(node.removeprefix("node-"), node)

    aggregate = None
    if last is not None:
        aggregate = {
            k: last.get(k)
            for k in ("round", "hosts", "heldout", "rejected", "failed", "wall_s")
        }
        aggregate["failed"] = {
            name(n): why for n, why in (last.get("failed") or {}).items()
        }
    return {
        "run_folder": str(folder.path),
        "rounds_done": folder.last_round(),
        "rounds_total": run_cfg.federation.rounds,
        "connected_hosts": (
            None
            if nodes is None
            else sorted(
                name(str(n.get("node-id", n.get("node_id", ""))))
                for n in nodes
                if n.get("status") == "online"
            )
        ),
        "last_aggregate": aggregate,
        "epsilon": (last or {}).get("epsilon", {}),
        "client_dp": {
            k: v for k, v in (last or {}).get("client_dp", {}).items() if k != "clipped"
        }
        or None,
    }
