"""The gRPC ingest service in process: quota, streaming push, stats; retention."""

import json
import time

import grpc
import pytest

from client.ingest import Ingestor
from client.service import IngestService, serve
from client.store import Store, load_key
from common.proto import ingest_pb2, ingest_pb2_grpc
from tests.integration.agent_util import free_port


@pytest.fixture
def service(tmp_path):
    store = Store(tmp_path / "store.db", load_key(tmp_path / "key"), quota_bytes=8000)
    port = free_port()
    server = serve(
        IngestService(Ingestor(store), lambda: ingest_pb2.Stats(stored=7)),
        f"127.0.0.1:{port}",
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield store, ingest_pb2_grpc.IngestStub(channel)
    channel.close()
    server.stop(None)
    store.close()


def _records(n, start=0):
    return [
        ingest_pb2.Record(
            text=f"visit {i}: the patient reports a mild rash on the "
            f"left arm after {i} days",
            id=str(i),
        )
        for i in range(start, start + n)
    ]


def test_streaming_push_acknowledges_each_record(service):
    _, stub = service
    reply = stub.Push(iter(_records(10)), timeout=10)
    assert reply.stored == 10 and [a.seq for a in reply.acks] == list(range(1, 11))
    assert stub.GetStats(ingest_pb2.StatsRequest()).stored == 7


def test_quota_answers_resource_exhausted_and_stores_nothing(service):
    store, stub = service
    assert stub.PushBatch(ingest_pb2.RecordBatch(records=_records(20))).stored == 20
    before = (store.count(), store.counters())
    with pytest.raises(grpc.RpcError) as err:
        stub.PushBatch(ingest_pb2.RecordBatch(records=_records(80, start=100)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota" in err.value.details()
    assert (store.count(), store.counters()) == before


def test_retention_removes_old_records_but_keeps_their_spend(tmp_path):
    store = Store(tmp_path / "store.db", load_key(tmp_path / "key"))
    Ingestor(store).submit(
        [
            (json.dumps({"text": f"note {i} " + "x " * i}).encode(), "t")
            for i in range(6)
        ]
    )
    store.db.execute(
        "UPDATE records SET elig = 3, queries = 5, arrived = 1000 WHERE seq <= 2"
    )
    spend = store.spend()
    assert store.purge(older_than=time.time() - 86400) == 2
    assert store.count(live=False) == 4
    assert store.spend() == spend  # the old records' privacy spend is still counted
    assert store.counters()["purged"] == 2
