"""Real deployments on loopback: server launcher, agents with SuperNodes, cleanup.

Every process is started in its own session; at the end the whole tree under it is
stopped by PID (Flower starts SuperExec and app processes in sessions of their own,
so a process group alone would not reach them).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.corpus import host_stream
from tests.conftest import ROOT
from tests.integration.agent_util import free_port, wait_port

ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "HF_HUB_OFFLINE": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def kill_tree(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


@dataclass
class Proc:
    """A started process and every process it started (tracked while alive)."""

    popen: subprocess.Popen[bytes]
    log: Path
    seen: set[int] = field(default_factory=set)

    def track(self) -> None:
        if self.popen.poll() is None:
            self.seen.update(descendants(self.popen.pid))

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait, then SIGKILL whatever is left of the tree."""
        self.track()
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self.reap()
        return code

    def kill9(self) -> None:
        """``kill -9`` of the process and all it started, as a machine crash."""
        self.track()
        kill_tree([self.popen.pid, *self.seen])
        self.popen.wait()

    def reap(self) -> None:
        deadline = time.monotonic() + 10
        left = [p for p in self.seen if alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [p for p in left if alive(p)]
        kill_tree(left)


def start(cmd: list[str], log: Path, cwd: Path = ROOT) -> Proc:
    fh = log.open("ab")
    popen = subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=fh, stderr=fh, start_new_session=True
    )
    fh.close()
    return Proc(popen, log)


def write_agent(
    root: Path,
    name: str,
    *,
    superlink: str,
    certs: Path,
    min_records: int,
    supernode_extra: str = "",
) -> tuple[Path, Path, int]:
    """Agent config for host ``name``: (config path, data dir, ingest port)."""
    data = root / name
    port = free_port()
    cfg = root / f"{name}.toml"
    cfg.write_text(
        f'data_dir = "{data}"\n'
        f'[[sources]]\ntype = "grpc"\nlisten = "127.0.0.1:{port}"\n'
        f"[supernode]\n"
        f'superlink = "{superlink}"\n'
        f'root_certificates = "{certs / "ca.crt"}"\n'
        f'auth_key = "{certs / "hosts" / name / "auth.key"}"\n'
        f"runtime_port = {free_port()}\n"
        f"min_records = {min_records}\n"
        f"restart_backoff_s = 0.5\n" + supernode_extra
    )
    return cfg, data, port


def push_stream(host: int, n: int, port: int, tmp: Path) -> str:
    """``fedstream-agent push`` of ``n`` built-in records; returns its summary."""
    path = tmp / f"push-{host}-{port}.jsonl"
    rows = host_stream(host, n, seed=0)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    wait_port(port)
    proc = subprocess.run(
        [script("fedstream-agent"), "push", str(path), "--to", f"127.0.0.1:{port}"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def wait_for(
    predicate: object, timeout: float, what: str, *, poll: float = 0.5
) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError(f"{what} not within {timeout}s")


def ledger_round(data_dir: Path) -> int:
    """The last round the host's ledger committed a selection for (cheap, no key)."""
    import sqlite3

    if not (data_dir / "store.db").exists():
        return 0
    db = sqlite3.connect(f"file:{data_dir / 'store.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='last_round'").fetchone()
        return 0 if row is None else int(row[0])
    finally:
        db.close()


def agent_status(config: Path) -> dict[str, object]:
    out = subprocess.run(
        [script("fedstream-agent"), "status", "--config", str(config), "--json"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    info: dict[str, object] = json.loads(out.stdout)
    return info


def metrics(out: Path) -> list[dict[str, object]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_tracked(cmd: list[str], log: Path, timeout: float) -> int:
    """Run to completion with output in ``log``; stop anything it left behind.

    (Not ``capture_output``: Flower's detached SuperExec child would keep the pipe
    open long after the command itself has exited.)
    """
    proc = start(cmd, log)
    deadline = time.monotonic() + timeout
    while proc.popen.poll() is None and time.monotonic() < deadline:
        proc.track()
        time.sleep(0.2)
    return proc.stop(timeout=5)
