"""The data host's training worker (``client.worker``): real worker processes on real
encrypted stores, reached by the SuperNode's ClientApp front (``client.clientapp``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.serde import context_to_proto, message_to_proto

from client.clientapp import app as front
from client.worker import SOCKET
from common.adapter import to_record, trainable_state, unpack_global
from common.config import RunConfig
from common.models import build_adapter_model, load_base_model
from server.loopback import Loopback
from server.policies import make_policy
from server.secure import SecureAdapterFedAvg
from server.strategy import AdapterFedAvg
from tests.conftest import ROOT, fill_store
from tests.integration.agent_util import stop
from tests.integration.deploy_util import ENV

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("task_identity")]


def _listening(data_dir: Path) -> int:
    path = data_dir / "worker.log"
    return path.read_text().count("training worker listening") if path.exists() else 0


def _start_worker(data_dir: Path) -> subprocess.Popen[bytes]:
    started = _listening(data_dir)
    log = (data_dir / "worker.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.worker", "--data-dir", str(data_dir)],
        env=ENV,
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    log.close()
    deadline = time.monotonic() + 120
    while _listening(data_dir) == started:
        assert proc.poll() is None, (data_dir / "worker.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "worker did not start listening"
        time.sleep(0.2)
    return proc


def _cfg(**aggregation) -> RunConfig:
    return RunConfig.build(
        {
            "model": {"name": "tiny-llama", "max_length": 32},
            "training": {"sample_rate": 0.25, "local_steps": 2},
            "privacy": {"noise_multiplier": 1.0},
            "aggregation": {"policy": "drift", **aggregation},
            "federation": {"rounds": 3},
        }
    )


def _strategy(cfg: RunConfig, cls=AdapterFedAvg):
    base = load_base_model(cfg.model)
    arrays = trainable_state(build_adapter_model(base, cfg.lora, seed=cfg.seed))
    strat = cls(
        global_arrays=OrderedDict((k, v.copy()) for k, v in arrays.items()),
        base_config={f"run.{k}": v for k, v in cfg.to_flat().items()},
        policy=make_policy(cfg.aggregation),
        min_available_nodes=1,
        min_train_nodes=1,
    )
    return strat, arrays


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two hosts, each with a store and a running worker."""
    root = tmp_path_factory.mktemp("workers")
    dirs = {101 + i: root / f"host-{i}" for i in range(2)}
    for i, d in enumerate(dirs.values()):
        fill_store(d, i)
    procs = [_start_worker(d) for d in dirs.values()]
    try:
        yield dirs, procs
    finally:
        for p in procs:
            stop(p)


def _answered(data_dir: Path) -> int:
    return (data_dir / "worker.log").read_text().count("answered train message")


def test_socket_is_private_to_the_agent_user(hosts):
    dirs, _ = hosts
    for d in dirs.values():
        assert (d / SOCKET).stat().st_mode & 0o777 == 0o600


def test_secure_round_through_the_workers(hosts):
    """A SecAgg+ round where the front hands training to each host's worker: the
    delta the worker keeps in the node state comes back to the front, which answers
    the three exchanges itself; the aggregate is all hosts'."""
    dirs, _ = hosts
    cfg = _cfg(secure=True)
    strat, arrays = _strategy(cfg, SecureAdapterFedAvg)
    grid = Loopback(dirs, app=front)
    before = {nid: _answered(d) for nid, d in dirs.items()}
    msgs = strat.configure_train(1, to_record(arrays), ConfigRecord(), grid)
    record, metrics = strat.aggregate_train(1, grid.send_and_receive(msgs))
    assert record is not None and metrics["hosts"] == 2, strat.outcome.failed
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    out = to_record(unpack_global(record, shapes))
    assert set(grid.deltas) == set(dirs)  # each worker's delta reached the front
    for nid, d in dirs.items():
        assert _answered(d) == before[nid] + 1  # trained by the worker, once
    moved = max(float(np.abs(out[k].numpy() - arrays[k]).max()) for k in arrays)
    assert moved > 1e-4


FRONT = """
import json, sys
from pathlib import Path
from flwr.common.serde import context_from_proto, message_from_proto
from flwr.proto.message_pb2 import Context, Message
from client.clientapp import app
pm, pc = Message(), Context()
pm.ParseFromString(Path(sys.argv[1]).read_bytes())
pc.ParseFromString(Path(sys.argv[2]).read_bytes())
reply = app(message_from_proto(pm), context_from_proto(pc))
print(json.dumps({
    "torch": "torch" in sys.modules,
    "error": reply.error.reason if reply.has_error() else None,
    "arrays": list(reply.content.array_records) if reply.has_content() else [],
}))
"""


def _front_process(tmp_path: Path, data_dir: Path, nid: int) -> dict:
    cfg = _cfg()
    strat, arrays = _strategy(cfg)
    grid = Loopback({nid: data_dir})
    (msg,) = strat.configure_train(1, to_record(arrays), ConfigRecord(), grid)
    context = Context(
        run_id=1,
        node_id=nid,
        node_config={"data-dir": str(data_dir)},
        state=RecordDict(),
        run_config={},
    )
    (tmp_path / "m.pb").write_bytes(message_to_proto(msg).SerializeToString())
    (tmp_path / "c.pb").write_bytes(context_to_proto(context).SerializeToString())
    proc = subprocess.run(
        [sys.executable, "-c", FRONT, str(tmp_path / "m.pb"), str(tmp_path / "c.pb")],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_front_never_imports_torch_while_a_worker_listens(hosts, tmp_path):
    """In the SuperNode's ClientApp process (a fresh one per message) the front
    answers a train message without importing the training code; with the worker
    stopped, the same process trains itself."""
    dirs, procs = hosts
    nid, data_dir = 101, dirs[101]
    got = _front_process(tmp_path, data_dir, nid)
    assert got == {"torch": False, "error": None, "arrays": ["arrays"]}

    stop(procs[0])
    try:
        got = _front_process(tmp_path, data_dir, nid)
        assert got == {"torch": True, "error": None, "arrays": ["arrays"]}
    finally:
        procs[0] = _start_worker(data_dir)  # the socket left behind is replaced
    assert _front_process(tmp_path, data_dir, nid)["torch"] is False


def test_a_worker_that_dies_mid_answer_fails_the_round_for_its_host(tmp_path):
    """A socket peer that closes after reading the request: the front replies with
    an error (nothing half-written goes out) instead of training a second time."""
    data_dir = tmp_path / "host"
    data_dir.mkdir()
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"/proc/self/fd/{fd}/{SOCKET}")
    os.close(fd)
    server.listen(1)

    def dying_peer() -> None:
        conn, _ = server.accept()
        conn.recv(64)
        conn.close()

    thread = threading.Thread(target=dying_peer, daemon=True)
    thread.start()
    cfg = _cfg()
    strat, arrays = _strategy(cfg)
    grid = Loopback({101: data_dir}, app=front)
    (msg,) = strat.configure_train(1, to_record(arrays), ConfigRecord(), grid)
    reply = front(msg, grid.contexts[101])
    thread.join(timeout=10)
    server.close()
    assert reply.has_error()
    assert "training worker failed" in reply.error.reason
