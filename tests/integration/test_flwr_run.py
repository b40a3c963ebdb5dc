"""`flwr run .` runs the same ServerApp/ClientApp on Flower's own simulation runtime."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _pids_using(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (our private FLWR_HOME)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _stop(pids: list[int]) -> None:
    """SIGTERM, wait up to 20 s (its simulation child exits with it), then SIGKILL."""
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_flwr_run_dot(tmp_path):
    home = tmp_path / "flwr-home"
    out = tmp_path / "run"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    flwr = str(Path(sys.executable).with_name("flwr"))
    overrides = f"model.name='tiny-llama' federation.rounds=1 out='{out}'"
    try:
        proc = subprocess.run(
            [flwr, "run", ".", "--run-config", overrides, "--stream"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        _stop(_pids_using(str(home)))  # the local SuperLink `flwr run` started
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["round"] for ln in lines] == [0, 1]
    assert len(lines[1]["hosts"]) >= 2 and not lines[1]["failed"]
    assert (out / "global" / "round-1" / "adapter_model.safetensors").exists()
