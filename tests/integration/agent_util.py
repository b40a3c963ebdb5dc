"""Helpers to run a real fedstream-agent process on loopback and read its store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(data_dir: Path, sources: str, extra: str = "") -> Path:
    cfg = data_dir.parent / f"{data_dir.name}.toml"
    cfg.write_text(f'data_dir = "{data_dir}"\n{extra}\n{sources}\n')
    return cfg


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fh = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "client.agent", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=fh,
        stderr=fh,
    )


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def stop(proc: subprocess.Popen[bytes], sig: int | None = None) -> None:
    if proc.poll() is None:
        if sig is None:
            proc.terminate()
        else:
            proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stored_count(data_dir: Path) -> int:
    """Rows in the store, read without the key (cheap enough to poll)."""
    import sqlite3

    db = sqlite3.connect(f"file:{data_dir / 'store.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    finally:
        db.close()


def stored_ids(data_dir: Path) -> list[str]:
    from client.store import Store, load_key

    store = Store(data_dir / "store.db", load_key(data_dir / "store.key", create=False))
    try:
        return [r.content.get("id", "") for r in store.iter_records()]
    finally:
        store.close()
