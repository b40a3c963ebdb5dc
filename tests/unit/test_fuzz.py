"""Property-based bad input: at least 10,000 generated inputs at the gate and the gRPC
service. Nothing crashes; every input is stored or quarantined with a reason; every
planted secret is replaced by its placeholder."""

from __future__ import annotations

import json

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.gate import Clean, Gate, Rejected
from client.ingest import Ingestor
from client.service import IngestService, serve
from client.store import Store, load_key
from common.proto import ingest_pb2, ingest_pb2_grpc
from tests.integration.agent_util import free_port
from tests.unit.test_gate import PLANTED

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

words = st.lists(
    st.sampled_from(
        [
            "the",
            "patient",
            "card",
            "wire",
            "call",
            "logs",
            "ticket",
            "ok",
            "é",
            "日本",
            "\x00",
            "\t",
            "-",
            "@",
        ]
    ),
    max_size=30,
).map(" ".join)
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda c: (
        st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4)
    ),
    max_leaves=20,
)
huge = st.builds(
    lambda piece, n: piece * (n // len(piece) + 1),
    st.text(min_size=1, max_size=4),
    st.integers(30_000, 70_000),
)
field_values = st.one_of(words, json_values, st.text(max_size=300), huge)
records = st.fixed_dictionaries(
    {},
    optional={
        "text": field_values,
        "prompt": field_values,
        "response": field_values,
        "tags": field_values | st.lists(st.text(max_size=20), max_size=20),
        "label": field_values,
        "ts": field_values,
        "id": field_values,
        "extra": json_values,
    },
)
broken_utf8 = st.binary(max_size=40).map(
    lambda b: b'{"text": "' + b + b"\xc3\x28" + b'"}'
)
raw_inputs = st.one_of(
    st.binary(max_size=200),
    broken_utf8,
    records.map(lambda r: json.dumps(r).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 300).map(
        lambda d: b'{"text": "x", "tags": ' + b"[" * d + b"]" * d + b"}"
    ),
)


# One gate for every example, as the agent keeps one: a gate holds no state that
# changes a verdict (only compiled patterns), and building one per example costs a
# fresh pattern compilation each time.
GATE = Gate()


def _with_secret(prefix: str, kind: str, suffix: str) -> tuple[bytes, str]:
    return json.dumps({"text": f"{prefix} {PLANTED[kind]} {suffix}"}).encode(), kind


planted = st.builds(_with_secret, words, st.sampled_from(sorted(PLANTED)), words)


def _check_verdict(verdict: Clean | Rejected) -> None:
    assert isinstance(verdict, Clean | Rejected)
    if isinstance(verdict, Rejected):
        assert verdict.reason and not verdict.reason.startswith("gate_error")
    else:
        assert any(verdict.content.get(k, "").strip() for k in ("text", "prompt"))
        json.dumps(verdict.content).encode("utf-8")  # storable as-is


def test_gate_never_crashes_and_always_gives_a_reason():
    """Batches of generated inputs (hypothesis's cost is per example, so several
    inputs an example): each through the batch path the agent takes
    (``inspect_many``: the native pass, then the exact path for the rest) and one
    by one (``inspect``), with the same verdict both ways."""
    seen = {"n": 0}

    @settings(parent=FUZZ, max_examples=1000)
    @given(st.lists(raw_inputs, min_size=6, max_size=10))
    def check(raws):
        seen["n"] += len(raws)
        verdicts = GATE.inspect_many(raws)
        assert len(verdicts) == len(raws)
        for raw, verdict in zip(raws, verdicts, strict=True):
            _check_verdict(verdict)
            assert GATE.inspect(raw) == verdict

    check()
    assert seen["n"] >= 6000


def test_planted_secrets_never_reach_the_store():
    seen = {"n": 0, "clean": 0}

    @settings(parent=FUZZ, max_examples=1500)
    @given(planted)
    def check(item):
        seen["n"] += 1
        raw, kind = item
        verdict = GATE.inspect(raw)
        if isinstance(verdict, Clean):
            seen["clean"] += 1
            assert PLANTED[kind] not in verdict.content["text"]
            assert f"[{kind}]" in verdict.content["text"]
            assert verdict.pii[kind] >= 1

    check()
    assert seen["n"] >= 1500 and seen["clean"] >= 1000


def test_grpc_service_accounts_for_every_input(tmp_path):
    store = Store(tmp_path / "store.db", load_key(tmp_path / "key"))
    ingestor = Ingestor(store)
    port = free_port()
    server = serve(
        IngestService(ingestor, lambda: ingest_pb2.Stats()), f"127.0.0.1:{port}"
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = ingest_pb2_grpc.IngestStub(channel)
    sent = {"n": 0}

    @settings(parent=FUZZ, max_examples=450)
    @given(st.lists(raw_inputs | planted.map(lambda x: x[0]), min_size=4, max_size=24))
    def push(batch):
        reply = stub.PushBatch(
            ingest_pb2.RecordBatch(
                records=[ingest_pb2.Record(raw=raw) for raw in batch]
            ),
            timeout=30,
        )
        assert len(reply.acks) == len(batch)
        for ack in reply.acks:
            assert ack.status != ingest_pb2.Ack.STATUS_UNSPECIFIED
            if ack.status == ingest_pb2.Ack.QUARANTINED:
                assert ack.reason
        sent["n"] += len(batch)

    try:
        push()
        c = store.counters()
        assert c["received"] == sent["n"]
        assert c["received"] == c.get("stored", 0) + c.get("duplicates", 0) + c.get(
            "quarantined", 0
        )
        for rec in store.iter_records():
            text = rec.content.get("text", "") + rec.content.get("prompt", "")
            assert not any(secret in text for secret in PLANTED.values())
    finally:
        channel.close()
        server.stop(None)
        store.close()
    # 6000 + 1500 inputs at the gate above, and these through the service: > 10,000.
    assert sent["n"] >= 2500
