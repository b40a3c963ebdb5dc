"""Stream sources, picked by name from ``SOURCES``: ``grpc``, ``jsonl``, ``kafka``.

Each source feeds the shared ``Ingestor`` and never acknowledges upstream before the
store has committed:

* ``grpc``: the ingest service (``client.service``); the reply is the acknowledgement.
* ``jsonl``: tails a file or every ``*.jsonl`` in a folder. The byte offset after the
  last complete line is committed in the same transaction as the records, so a restart
  resumes exactly there; a last line without its newline waits until it is complete.
* ``kafka``: a consumer group member with auto-commit off; offsets are committed to the
  broker only after the store commit (at-least-once), and a redelivered record is a
  duplicate by id or content hash, so it is stored once.

The file tail and the Kafka consumer feed batches through ``Ingestor.submit_stream``:
the next batch is checked (by the ingest workers, where there are any) while the
last one commits.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from client.ingest import Ingestor
from client.store import QuotaExceeded
from common.agent_config import GrpcSource, JsonlSource, KafkaSource

__all__ = ["SOURCES", "GrpcIngest", "JsonlTail", "KafkaConsumer", "Source"]

log = logging.getLogger(__name__)
Item = tuple[bytes | dict[str, Any], str]
STREAM_BATCHES = 64  # Kafka: batches a poll at most, pipelined


class Source(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop taking input; return after the batch in hand is committed."""


class _Loop:
    """A polling thread that stops between batches, never inside one."""

    def __init__(self, name: str, period: float) -> None:
        self.name = name
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.poll()
            except QuotaExceeded as err:
                log.error("%s: %s; retrying in 10 s", self.name, err)
                self._stop.wait(10)
                continue
            except Exception:
                log.exception("%s: poll failed; retrying", self.name)
                busy = False
            if not busy:
                self._stop.wait(self.period)
        self.close()

    def poll(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlTail(_Loop):
    def __init__(self, cfg: JsonlSource, ingestor: Ingestor) -> None:
        super().__init__(f"jsonl:{cfg.path}", cfg.poll_s)
        self.cfg = cfg
        self.ingestor = ingestor

    def files(self) -> list[Path]:
        path = Path(self.cfg.path)
        if path.is_dir():
            return sorted(path.glob("*.jsonl"))
        return [path] if path.exists() else []

    def poll(self) -> bool:
        busy = False
        for path in self.files():
            busy |= self._poll_file(path)
        return busy

    def _poll_file(self, path: Path) -> bool:
        key = f"jsonl:{path.resolve()}"
        offset = int(self.ingestor.store.offset(key) or 0)
        size = path.stat().st_size
        if size < offset:  # truncated or replaced: start over; dedup drops repeats
            log.warning("%s shrank below its saved offset; reading it again", path)
            offset = 0
        if size == offset:
            return False
        with path.open("rb") as fh:
            fh.seek(offset)
            chunk = fh.read(min(size - offset, 8 * 1024 * 1024))
        end = chunk.rfind(b"\n")
        if end < 0:
            return False  # an incomplete last line: wait for its newline
        lines = chunk[: end + 1].split(b"\n")[:-1]

        def batches() -> Iterator[tuple[list[Item], dict[str, str]]]:
            pos = offset
            items: list[Item] = []
            for line in lines:
                pos += len(line) + 1
                if line.strip():
                    items.append((line.rstrip(b"\r"), self.name))
                if len(items) >= self.cfg.batch:
                    yield items, {key: str(pos)}
                    items = []
            yield items, {key: str(pos)}  # the offset moves past blank lines too

        # Batch k+1 is checked while batch k commits; each batch's offset is
        # committed with its records.
        for _ in self.ingestor.submit_stream(batches(), acks=False):
            pass
        return True


class KafkaConsumer(_Loop):
    def __init__(self, cfg: KafkaSource, ingestor: Ingestor) -> None:
        super().__init__(f"kafka:{cfg.topic}", 0.05)
        from confluent_kafka import Consumer

        self.cfg = cfg
        self.ingestor = ingestor
        self.consumer = Consumer(
            {
                "bootstrap.servers": cfg.bootstrap,
                "group.id": cfg.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # librdkafka's defaults make the first group join take ~20 s.
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
            }
        )
        self.consumer.subscribe([cfg.topic])

    def poll(self) -> bool:
        """Up to ``STREAM_BATCHES`` batches, each stored and then its offsets
        committed (batch k+1 is consumed and checked while batch k commits, so
        the offsets committed are each batch's own, not the consumer's position)."""
        from confluent_kafka import TopicPartition

        marks: deque[list[Any]] = deque()

        def batches() -> Iterator[tuple[list[Item], None]]:
            for n in range(STREAM_BATCHES):
                msgs = self.consumer.consume(
                    num_messages=self.cfg.batch, timeout=0.5 if n == 0 else 0.0
                )
                if not msgs:
                    return
                items: list[Item] = []
                ends: dict[tuple[str, int], int] = {}
                for msg in msgs:
                    if msg.error():
                        log.warning("%s: %s", self.name, msg.error())
                        continue
                    items.append((msg.value() or b"", self.name))
                    topic, part, at = msg.topic(), msg.partition(), msg.offset()
                    if topic is not None and part is not None and at is not None:
                        ends[(topic, part)] = at + 1
                marks.append([TopicPartition(t, p, o) for (t, p), o in ends.items()])
                yield items, None

        busy = False
        for _ in self.ingestor.submit_stream(batches(), acks=False):
            done = marks.popleft()
            if done:  # only after the store commit
                self.consumer.commit(offsets=done, asynchronous=False)
            busy = True
        return busy

    def close(self) -> None:
        self.consumer.close()


class GrpcIngest:
    def __init__(
        self, cfg: GrpcSource, ingestor: Ingestor, stats: Callable[[], Any]
    ) -> None:
        from client.service import IngestService

        self.name = f"grpc:{cfg.listen}"
        self.cfg = cfg
        self.service = IngestService(
            ingestor, stats, max_records=cfg.max_records_per_call
        )
        self.server: Any = None

    def start(self) -> None:
        from client.service import serve

        self.server = serve(self.service, self.cfg.listen)

    def stop(self) -> None:
        if self.server is not None:
            # Refuse new calls; calls in flight finish their commit and reply.
            self.server.stop(grace=30).wait()


SOURCES: dict[str, Callable[..., Any]] = {
    "grpc": GrpcIngest,
    "jsonl": JsonlTail,
    "kafka": KafkaConsumer,
}
