"""The gRPC ingest service (``protos/ingest.proto``) in front of the store.

Each call is one transaction: the reply (with one acknowledgement per record) is sent
only after the commit, so an acknowledged record survives ``kill -9``. At the store's
quota the call fails with RESOURCE_EXHAUSTED and nothing of it is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from client.ingest import DUPLICATE, QUARANTINED, STORED, Ack, Ingestor
from client.store import QuotaExceeded
from common.proto import ingest_pb2, ingest_pb2_grpc

__all__ = ["IngestService", "record_to_input", "serve"]

log = logging.getLogger(__name__)

_STATUS = {
    STORED: ingest_pb2.Ack.STORED,
    DUPLICATE: ingest_pb2.Ack.DUPLICATE,
    QUARANTINED: ingest_pb2.Ack.QUARANTINED,
}


def record_to_input(rec: ingest_pb2.Record) -> bytes | dict[str, Any]:
    """A Record message as the gate's input: its ``raw`` bytes, or its fields."""
    if rec.raw:
        return bytes(rec.raw)
    out: dict[str, Any] = {}
    for name in ("text", "prompt", "response", "label", "id"):
        value = getattr(rec, name)
        if value:
            out[name] = value
    if rec.tags:
        out["tags"] = list(rec.tags)
    if rec.ts:
        out["ts"] = rec.ts
    return out


def summary(acks: list[Ack]) -> ingest_pb2.PushSummary:
    msg = ingest_pb2.PushSummary(
        acks=[
            ingest_pb2.Ack(status=_STATUS[a.status], reason=a.reason, seq=a.seq)
            for a in acks
        ]
    )
    msg.stored = sum(a.status == STORED for a in acks)
    msg.duplicates = sum(a.status == DUPLICATE for a in acks)
    msg.quarantined = sum(a.status == QUARANTINED for a in acks)
    return msg


class IngestService(ingest_pb2_grpc.IngestServicer):
    def __init__(
        self,
        ingestor: Ingestor,
        stats: Callable[[], ingest_pb2.Stats],
        *,
        max_records: int = 10_000,
    ) -> None:
        self.ingestor = ingestor
        self.stats = stats
        self.max_records = max_records

    def _commit(
        self, records: list[ingest_pb2.Record], context: grpc.ServicerContext
    ) -> ingest_pb2.PushSummary:
        if len(records) > self.max_records:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(records)} records in one call; the limit is {self.max_records}: "
                "split the stream",
            )
        try:
            acks = self.ingestor.submit([(record_to_input(r), "grpc") for r in records])
        except QuotaExceeded as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        return summary(acks)

    def Push(
        self,
        request_iterator: Iterator[ingest_pb2.Record],
        context: grpc.ServicerContext,
    ) -> ingest_pb2.PushSummary:
        records = []
        for rec in request_iterator:
            records.append(rec)
            if len(records) > self.max_records:
                break
        return self._commit(records, context)

    def PushBatch(
        self,
        request: ingest_pb2.RecordBatch,
        context: grpc.ServicerContext,
    ) -> ingest_pb2.PushSummary:
        return self._commit(list(request.records), context)

    def GetStats(
        self,
        request: ingest_pb2.StatsRequest,
        context: grpc.ServicerContext,
    ) -> ingest_pb2.Stats:
        return self.stats()


def serve(service: IngestService, listen: str, *, workers: int = 8) -> grpc.Server:
    """Start the service on ``listen`` (host:port); returns the running server."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    ingest_pb2_grpc.add_IngestServicer_to_server(service, server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    log.info("Ingest service listening on %s", listen)
    return server
