"""The data-host agent as a real process: gRPC push, kill -9, file tail, SIGTERM."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter

import grpc
import pytest

from common.proto import ingest_pb2, ingest_pb2_grpc
from tests.integration.agent_util import (
    free_port,
    start_agent,
    stop,
    stored_ids,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.slow


def _record(i: int) -> ingest_pb2.Record:
    return ingest_pb2.Record(
        text=f"record number {i} about topic {i % 7} " * 3,
        id=f"r{i}",
        tags=[f"t{i % 3}"],
    )


def _producer(port: int, acked: list[str], stop_flag: threading.Event, n: int) -> None:
    """Push records 0..n-1 in batches of 1-8; remember every acknowledged id."""
    rng = random.Random(port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = ingest_pb2_grpc.IngestStub(ch)
        i = 0
        while i < n and not stop_flag.is_set():
            size = rng.randint(1, 8)
            batch = [_record(j) for j in range(i, min(i + size, n))]
            try:
                reply = stub.PushBatch(ingest_pb2.RecordBatch(records=batch), timeout=5)
            except grpc.RpcError:
                return  # the agent died: everything acknowledged so far must be there
            for rec, ack in zip(batch, reply.acks, strict=True):
                assert ack.status in (ingest_pb2.Ack.STORED, ingest_pb2.Ack.DUPLICATE)
                acked.append(rec.id)
            i += len(batch)


def test_kill_9_never_loses_an_acknowledged_record(tmp_path):
    rng = random.Random(1234)
    port = free_port()
    data = tmp_path / "host"
    cfg = write_config(
        data,
        f'[[sources]]\ntype = "grpc"\nlisten = "127.0.0.1:{port}"',
        '[store]\nsynchronous = "NORMAL"',
    )
    acked: list[str] = []
    trials = 20
    for trial in range(trials):
        proc = start_agent(cfg, tmp_path / "agent.log")
        wait_port(port)
        flag = threading.Event()
        t = threading.Thread(target=_producer, args=(port, acked, flag, 10**6))
        t.start()
        time.sleep(rng.uniform(0.05, 0.6))  # a random moment mid-push
        proc.kill()  # SIGKILL: no cleanup at all
        proc.wait()
        flag.set()
        t.join()
        ids = Counter(stored_ids(data))
        missing = [i for i in set(acked) if ids[i] == 0]
        assert not missing, f"trial {trial}: acknowledged but lost: {missing[:5]}"
        assert max(ids.values(), default=1) == 1, "a record was stored twice"
    assert len(set(acked)) > 100  # the trials really pushed data


def test_push_cli_status_and_sigterm_drain(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    port = free_port()
    data = tmp_path / "host"
    cfg = write_config(data, f'[[sources]]\ntype = "grpc"\nlisten = "127.0.0.1:{port}"')
    lines = [
        json.dumps(
            {"text": f"support ticket {i}: printer jams on page {i * 3}", "id": str(i)}
        )
        for i in range(50)
    ]
    lines += [
        '{"text": "mail me at jane@example.com please", "id": "pii"}',
        "not json at all",
        '{"text": ""}',
        lines[0],
    ]
    src = tmp_path / "records.jsonl"
    src.write_text("\n".join(lines) + "\n")
    proc = start_agent(cfg, tmp_path / "agent.log")
    try:
        wait_port(port)

        def cli(*args):
            return subprocess.run(
                [sys.executable, "-m", "client.agent", *args],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
            )

        out = cli("push", str(src), "--to", f"127.0.0.1:{port}")
        assert out.returncode == 0, out.stderr
        assert "stored 51, duplicates 1, quarantined 2" in out.stdout
        st = cli("status", "--config", str(cfg), "--json")
        info = json.loads(st.stdout)
        assert info["received"] == 54 and info["stored"] == 51
        assert info["quarantined_by_reason"] == {"invalid_json": 1, "empty": 1}
        assert info["pii_redactions"] == {"EMAIL": 1}
        bad = cli("push", str(src), "--to", "127.0.0.1:1")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    finally:
        stop(proc, signal.SIGTERM)
    assert proc.returncode == 0
    assert "drained and stopped" in (tmp_path / "agent.log").read_text()


def test_jsonl_tail_resumes_at_its_offset_and_waits_for_a_full_line(tmp_path):
    data = tmp_path / "host"
    stream = tmp_path / "stream"
    stream.mkdir()
    cfg = write_config(
        data, f'[[sources]]\ntype = "jsonl"\npath = "{stream}"\npoll_s = 0.05'
    )
    f = stream / "a.jsonl"
    f.write_text(
        "".join(
            json.dumps({"text": f"log line {i} of the first part", "id": f"a{i}"})
            + "\n"
            for i in range(30)
        )
    )
    # A producer crashed mid-line: the line has no newline yet.
    with f.open("a") as fh:
        fh.write(
            '{"text": "the line that was cut',
        )
    proc = start_agent(cfg, tmp_path / "agent.log")
    try:
        _wait_for(lambda: len(stored_ids(data)) == 30)
    finally:
        stop(proc, signal.SIGKILL)
    with f.open("a") as fh:  # the producer finishes the line, then writes more
        fh.write(' off here", "id": "cut"}\n')
        fh.write(
            "".join(
                json.dumps({"text": f"log line {i} of the second part", "id": f"b{i}"})
                + "\n"
                for i in range(20)
            )
        )
    proc = start_agent(cfg, tmp_path / "agent.log")
    try:
        _wait_for(lambda: len(stored_ids(data)) == 51)
    finally:
        stop(proc)
    ids = stored_ids(data)
    assert len(ids) == len(set(ids)) == 51 and "cut" in ids


def _wait_for(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError("condition not reached")
