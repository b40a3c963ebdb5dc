"""Ingestion: gate -> dedup -> one durable transaction -> acknowledgements.

Every input ends in exactly one of three states, and the counters account for all of
them (``received == stored + duplicates + quarantined``):

* ``STORED``: committed to the store;
* ``DUPLICATE``: the same record (same producer id, or same content without an id) is
  already stored: a redelivery, nothing new to keep;
* ``QUARANTINED``: rejected by the gate, or a copy of stored content under another id
  (``duplicate``), or a near-duplicate of a recent record (``near_duplicate``); the raw
  input is kept (encrypted) in quarantine with its reason.

Near-duplicates are found with MinHash (``rensa``, Rust) over word 3-grams, banded LSH,
within a horizon of the most recent records held in memory (bounded by
``horizon``; rebuilt from the store after a restart).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from rensa import RMinHash

from client.gate import Clean, Gate, Rejected, normalise
from client.store import Batch, Store

__all__ = ["DUPLICATE", "QUARANTINED", "STORED", "Ack", "Ingestor"]

STORED, DUPLICATE, QUARANTINED = "STORED", "DUPLICATE", "QUARANTINED"
_PUNCT = re.compile(r"[^\w\s]+")


@dataclass(frozen=True)
class Ack:
    status: str
    reason: str = ""
    seq: int = 0


class NearDuplicates:
    """Banded MinHash LSH over the last ``horizon`` records."""

    def __init__(
        self,
        *,
        horizon: int,
        threshold: float,
        num_perm: int = 128,
        bands: int = 16,
        seed: int = 17,
    ) -> None:
        # 16 bands of 8 rows: a pair at Jaccard 0.8 becomes a candidate with
        # probability 1-(1-0.8^8)^16 = 0.95, a pair at 0.3 with 0.001.
        self.horizon = horizon
        self.threshold = threshold
        self.num_perm = num_perm
        self.rows = num_perm // bands
        self.seed = seed
        self.sketches: OrderedDict[int, np.ndarray] = OrderedDict()
        self.buckets: dict[tuple[int, bytes], set[int]] = defaultdict(set)

    def sketch(self, key_text: str) -> np.ndarray:
        words = _PUNCT.sub(" ", key_text).split()  # "costs." and "costs" are one word
        grams = [" ".join(words[i : i + 3]) for i in range(max(len(words) - 2, 1))]
        mh = RMinHash(num_perm=self.num_perm, seed=self.seed)
        mh.update(grams)
        return np.asarray(mh.digest(), dtype=np.uint32)

    def _bands(self, sketch: np.ndarray) -> list[tuple[int, bytes]]:
        raw, width = sketch.tobytes(), self.rows * sketch.itemsize
        return [(b, raw[b * width : (b + 1) * width]) for b in range(len(raw) // width)]

    def query(self, sketch: np.ndarray) -> bool:
        candidates: set[int] = set()
        for band in self._bands(sketch):
            found = self.buckets.get(band)
            if found:
                candidates |= found
        if not candidates:
            return False
        pool = np.stack([self.sketches[c] for c in candidates])  # (k, num_perm)
        return bool((pool == sketch).mean(axis=1).max() >= self.threshold)

    def add(self, key: int, sketch: np.ndarray) -> None:
        self.sketches[key] = sketch
        for band in self._bands(sketch):
            self.buckets[band].add(key)
        while len(self.sketches) > self.horizon:
            self.remove(next(iter(self.sketches)))

    def rekey(self, old: int, new: int) -> None:
        """Move a sketch to another key (a batch record gets its seq after commit)."""
        sketch = self.sketches.pop(old)
        self.sketches[new] = sketch
        for band in self._bands(sketch):
            bucket = self.buckets[band]
            bucket.discard(old)
            bucket.add(new)

    def remove(self, key: int) -> None:
        old = self.sketches.pop(key, None)
        if old is None:
            return
        for band in self._bands(old):
            bucket = self.buckets.get(band)
            if bucket is not None:
                bucket.discard(key)
                if not bucket:
                    del self.buckets[band]


def _raw_bytes(raw: bytes | dict[str, Any]) -> bytes:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    return json.dumps(raw, default=repr, ensure_ascii=False).encode("utf-8", "replace")


class Ingestor:
    """Thread-safe: producers on many gRPC threads share one store."""

    def __init__(
        self,
        store: Store,
        gate: Gate | None = None,
        *,
        horizon: int = 10_000,
        near_threshold: float = 0.8,
    ) -> None:
        self.store = store
        self.gate = gate or Gate()
        self.near = NearDuplicates(horizon=horizon, threshold=near_threshold)
        self.lock = threading.Lock()
        self._rebuild()

    def _rebuild(self) -> None:
        """Reload the near-duplicate horizon from the newest stored records."""
        rows = self.store.db.execute(
            "SELECT seq FROM records ORDER BY seq DESC LIMIT ?", (self.near.horizon,)
        ).fetchall()
        for rec in self.store.iter_records(sorted(r[0] for r in rows)):
            parts = [
                rec.content[k]
                for k in ("text", "prompt", "response")
                if k in rec.content
            ]
            self.near.add(rec.seq, self.near.sketch(normalise("\n".join(parts))))

    def submit(
        self,
        items: list[tuple[bytes | dict[str, Any], str]],
        offsets: dict[str, str] | None = None,
    ) -> list[Ack]:
        """Gate, dedup and commit ``(raw, source)`` items in one transaction.

        ``offsets`` (source -> position) are committed in the same transaction, so a
        source resumes exactly after what is stored. Raises ``QuotaExceeded`` with
        nothing written when the store is full.
        """
        with self.lock:
            return self._submit(items, offsets or {})

    def _submit(
        self, items: list[tuple[bytes | dict[str, Any], str]], offsets: dict[str, str]
    ) -> list[Ack]:
        batch = Batch(offsets=dict(offsets))
        acks: list[Ack | None] = []
        cleans: list[tuple[int, Clean, bytes, bytes, str, bytes]] = []
        for raw, source in items:
            batch.count("received")
            verdict = self.gate.inspect(raw)
            if isinstance(verdict, Rejected):
                self._quarantine(batch, verdict.reason, source, _raw_bytes(raw))
                acks.append(Ack(QUARANTINED, verdict.reason))
                continue
            h = self.store.keyed_hash
            chash = h(b"c:" + verdict.key_text.encode())
            rid = (
                h(b"i:" + verdict.content["id"].encode())
                if "id" in verdict.content
                else chash
            )
            group = verdict.content.get("label") or next(
                iter(verdict.content.get("tags", [])), ""
            )
            cleans.append(
                (len(acks), verdict, rid, chash, source, h(b"g:" + group.encode()))
            )
            acks.append(None)

        known_rids = self.store.known(c[2] for c in cleans)
        known_content = self.store.content_known(c[3] for c in cleans)
        seen_rids: set[bytes] = set()
        seen_content: set[bytes] = set()
        pending: list[tuple[int, np.ndarray]] = []
        for pos, clean, rid, chash, source, grp in cleans:
            if rid in known_rids or rid in seen_rids:
                batch.count("duplicates")
                acks[pos] = Ack(DUPLICATE, "already stored")
                continue
            raw = json.dumps(
                {**clean.content, **({"ts": clean.ts} if clean.ts else {})},
                ensure_ascii=False,
            ).encode()
            if chash in known_content or chash in seen_content:
                self._quarantine(batch, "duplicate", source, raw)
                acks[pos] = Ack(QUARANTINED, "duplicate")
                continue
            sketch = self.near.sketch(clean.key_text)
            if self.near.query(sketch):
                self._quarantine(batch, "near_duplicate", source, raw)
                acks[pos] = Ack(QUARANTINED, "near_duplicate")
                continue
            seen_rids.add(rid)
            seen_content.add(chash)
            # Indexed under a temporary key so later records of this batch see it;
            # replaced by its seq after the commit, removed if the commit fails.
            self.near.add(-1 - pos, sketch)
            batch.records.append((rid, chash, grp, clean.ts, clean.content))
            batch.count("stored")
            for kind, n in clean.pii.items():
                batch.count(f"pii:{kind}", n)
            pending.append((pos, sketch))

        try:
            seqs = self.store.commit(batch)
        except BaseException:
            for pos, _ in pending:
                self.near.remove(-1 - pos)
            raise
        for (pos, _), seq in zip(pending, seqs, strict=True):
            acks[pos] = Ack(STORED, "", seq)
            if -1 - pos in self.near.sketches:  # may have left a small horizon already
                self.near.rekey(-1 - pos, seq)
        return [a for a in acks if a is not None]

    @staticmethod
    def _quarantine(batch: Batch, reason: str, source: str, raw: bytes) -> None:
        batch.quarantine.append((reason, source, raw))
        batch.count("quarantined")
        batch.count(f"quarantined:{reason}")
