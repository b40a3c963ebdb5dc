"""Ingestion: gate -> dedup -> one durable transaction -> acknowledgements.

Every input ends in exactly one of three states, and the counters account for all of
them (``received == stored + duplicates + quarantined``):

* ``STORED``: committed to the store;
* ``DUPLICATE``: the same record (same producer id, or same content without an id) is
  already stored: a redelivery, nothing new to keep;
* ``QUARANTINED``: rejected by the gate, or a copy of stored content under another id
  (``duplicate``), or a near-duplicate of a recent record (``near_duplicate``); the raw
  input is kept (encrypted) in quarantine with its reason.

Exact duplicates are decided by the store's keyed hashes over its whole history; a
Bloom filter over those keys (``KNOWN_FILTER_LOG2`` bits, fixed memory) answers "not
stored" for almost every new record, so the store is asked only about the few keys
the filter may hold. It cannot miss a stored key: it is loaded from the store when
the ingestor starts and again, before each batch, with whatever was stored since
(also by another process); a false positive costs one lookup, never a decision.

Near-duplicates are found with MinHash over word 3-grams (tokens hashed natively,
digests by ``rensa``, Rust) and a native banded LSH index,
within a horizon of the most recent records held in memory (bounded by
``horizon``; rebuilt from the store after a restart).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any, NamedTuple

import numpy as np
from rensa import RMinHash

try:
    from client._native import KeyFilter, NearIndex, rows_to_bytes, token_hashes
except ImportError:  # not built (a Flower App bundle ships sources): same, slower
    from client.near_py import (  # type: ignore[assignment]
        KeyFilter,
        NearIndex,
        rows_to_bytes,
        token_hashes,
    )
from client.gate import Clean, Gate, Rejected, normalise
from client.store import Batch, Conflict, Store, StoreError

__all__ = ["DUPLICATE", "QUARANTINED", "STORED", "Ack", "Ingestor"]

STORED, DUPLICATE, QUARANTINED = "STORED", "DUPLICATE", "QUARANTINED"
_PUNCT = re.compile(r"[^\w\s]+")


class Ack(NamedTuple):
    status: str
    reason: str = ""
    seq: int = 0


_ALREADY_STORED = Ack(DUPLICATE, "already stored")
_CONFLICT_TRIES = 8  # another writer storing at the same moment: decide again
# 2**26 bits (8 MiB), 4 probes: false positives about 1 in 5,000 at a million stored
# records (two keys each), 1 in 4 at ten million; only the speed changes with them.
KNOWN_FILTER_LOG2, KNOWN_FILTER_K = 26, 4


def shingles(key_text: str) -> list[str]:
    """Word 3-grams ("costs." and "costs" are one word); the whole text if shorter."""
    w = _PUNCT.sub(" ", key_text).split()
    if len(w) < 3:
        return [" ".join(w)]
    return list(map(" ".join, zip(w, w[1:], w[2:], strict=False)))


class NearDuplicates:
    """Banded MinHash LSH over the last ``horizon`` records.

    Sketches of a batch are one ``(n, num_perm)`` uint32 matrix (bytes): tokens cut
    and hashed natively, digests by rensa (Rust). The band index is native too
    (``client._native.NearIndex``). A record is a near-duplicate when it shares a
    whole band with a kept record whose sketch agrees with its own in at least
    ``threshold`` of the permutations.
    """

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
        self.seed = seed
        self.index = NearIndex(
            num_perm=num_perm, bands=bands, horizon=horizon, threshold=threshold
        )

    def sketch_many(self, key_texts: list[str]) -> bytes:
        """``(len(key_texts), num_perm)`` uint32 digests, row-major."""
        # ASCII texts are cut into shingles natively (words are the [A-Za-z0-9_]
        # runs there); others need Unicode word characters, so Python cuts them.
        hashes, offsets = token_hashes(
            [t if t.isascii() else shingles(t) for t in key_texts]
        )
        matrix = RMinHash.digest_matrix_from_flat_token_hashes(
            np.frombuffer(hashes, dtype=np.uint64),
            np.frombuffer(offsets, dtype=np.uint64),
            self.num_perm,
            self.seed,
        )
        return rows_to_bytes(matrix.to_rows(), self.num_perm)

    def query(self, sketches: bytes, row: int = 0) -> bool:
        return self.index.query(sketches, row)

    def add(self, sketches: bytes, row: int = 0) -> int:
        """Index a sketch; returns its key (for ``remove``)."""
        return self.index.add(sketches, row)

    def offer(self, sketches: bytes, row: int) -> int:
        """``add`` unless it is a near-duplicate (then -1, nothing added)."""
        return self.index.offer(sketches, row)

    def remove(self, key: int) -> None:
        self.index.remove(key)

    def __len__(self) -> int:
        return len(self.index)


def _raw_bytes(raw: bytes | dict[str, Any]) -> bytes:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    return json.dumps(raw, default=repr, ensure_ascii=False).encode("utf-8", "replace")


def _content_bytes(clean: Clean) -> bytes:
    obj = {**clean.content, **({"ts": clean.ts} if clean.ts else {})}
    return json.dumps(obj, ensure_ascii=False).encode()


class Ingestor:
    """Thread-safe: producers on many gRPC threads share one store."""

    def __init__(
        self,
        store: Store,
        gate: Gate | None = None,
        *,
        horizon: int = 10_000,
        near_threshold: float = 0.8,
        known_filter_log2: int = KNOWN_FILTER_LOG2,
    ) -> None:
        self.store = store
        self.gate = gate or Gate()
        self.near = NearDuplicates(horizon=horizon, threshold=near_threshold)
        self.lock = threading.Lock()
        self.known_filter = KeyFilter(log2_bits=known_filter_log2, k=KNOWN_FILTER_K)
        self._filtered_upto = 0  # records up to this seq are in the filter
        self._load_known()
        self._rebuild()

    def _load_known(self, top: int | None = None) -> None:
        """Add the dedup keys of records stored since the last load to the filter
        (at least those up to ``top``)."""
        cur = self.store.db.execute(
            "SELECT seq, rid, chash FROM records WHERE seq > ? ORDER BY seq",
            (self._filtered_upto,),
        )
        while rows := cur.fetchmany(4096):
            self.known_filter.add([r[1] for r in rows] + [r[2] for r in rows])
            self._filtered_upto = int(rows[-1][0])
        self._filtered_upto = max(self._filtered_upto, top or 0)

    def _rebuild(self) -> None:
        """Reload the near-duplicate horizon from the newest stored records."""
        rows = self.store.db.execute(
            "SELECT seq FROM records ORDER BY seq DESC LIMIT ?", (self.near.horizon,)
        ).fetchall()
        texts = [
            normalise(
                "\n".join(
                    rec.content[k]
                    for k in ("text", "prompt", "response")
                    if k in rec.content
                )
            )
            for rec in self.store.iter_records(sorted(r[0] for r in rows))
        ]
        for i in range(0, len(texts), 1024):
            sketches = self.near.sketch_many(texts[i : i + 1024])
            for row in range(len(texts[i : i + 1024])):
                self.near.add(sketches, row)

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
            for _ in range(_CONFLICT_TRIES):
                try:
                    return self._submit(items, offsets or {})
                except Conflict:  # nothing written; the filter catches up first
                    continue
        raise StoreError(
            f"another writer kept storing records in {self.store.path}: gave up "
            f"after {_CONFLICT_TRIES} tries, nothing of this batch was written"
        )

    def _submit(
        self, items: list[tuple[bytes | dict[str, Any], str]], offsets: dict[str, str]
    ) -> list[Ack]:
        batch = Batch(offsets=dict(offsets))
        if items:
            batch.count("received", len(items))
        acks: list[Ack | None] = [None] * len(items)
        passed: list[tuple[int, Clean, str]] = []
        verdicts = self.gate.inspect_many([raw for raw, _ in items])
        for pos, ((raw, source), verdict) in enumerate(
            zip(items, verdicts, strict=True)
        ):
            if isinstance(verdict, Rejected):
                self._quarantine(batch, verdict.reason, source, _raw_bytes(raw))
                acks[pos] = Ack(QUARANTINED, verdict.reason)
                continue
            passed.append((pos, verdict, source))
        # Keyed hashes a batch at a time: content, producer id (else the content's),
        # balancing group (label, else first tag).
        hashes = self.store.keyed_hashes
        chashes = hashes(b"c:", [c.key_text for _, c, _ in passed])
        rids = list(chashes)
        with_id = [j for j, (_, c, _) in enumerate(passed) if "id" in c.content]
        ids = [passed[j][1].content["id"] for j in with_id]
        for j, rid in zip(with_id, hashes(b"i:", ids), strict=True):
            rids[j] = rid
        names = [
            c.content.get("label") or next(iter(c.content.get("tags", [])), "")
            for _, c, _ in passed
        ]
        distinct = list(dict.fromkeys(names))
        groups = dict(zip(distinct, hashes(b"g:", distinct), strict=True))
        cleans = [
            (pos, clean, rids[j], chashes[j], source, groups[names[j]])
            for j, (pos, clean, source) in enumerate(passed)
        ]

        # Decided against what is stored up to ``top``: a record stored by another
        # writer after it makes the commit raise Conflict, and the batch is decided
        # again.
        top = batch.decided_at = self.store.high_water()
        if top > self._filtered_upto:
            self._load_known(top)  # stored since (by us, or by another process)
        maybe = self.known_filter.maybe
        known_rids = self.store.known(maybe([c[2] for c in cleans]))
        known_content = self.store.content_known(maybe([c[3] for c in cleans]))
        # Sketched in one native call; the few exact duplicates among them are waste
        # worth less than a second pass.
        sketches = self.near.sketch_many([c[1].key_text for c in cleans])
        seen_rids: set[bytes] = set()
        seen_content: set[bytes] = set()
        pending: list[tuple[int, int]] = []  # (position, near-dup index key)
        near = self.near
        for j, (pos, clean, rid, chash, source, grp) in enumerate(cleans):
            if rid in known_rids or rid in seen_rids:
                batch.count("duplicates")
                acks[pos] = _ALREADY_STORED
                continue
            if chash in known_content or chash in seen_content:
                self._quarantine(batch, "duplicate", source, _content_bytes(clean))
                acks[pos] = Ack(QUARANTINED, "duplicate")
                continue
            # Indexed now so later records of this batch see it; removed again if
            # the commit fails.
            key = near.offer(sketches, j)
            if key < 0:
                self._quarantine(batch, "near_duplicate", source, _content_bytes(clean))
                acks[pos] = Ack(QUARANTINED, "near_duplicate")
                continue
            seen_rids.add(rid)
            seen_content.add(chash)
            pending.append((pos, key))
            batch.records.append((rid, chash, grp, clean.ts, clean.content))
            for kind, n in clean.pii.items():
                batch.count(f"pii:{kind}", n)
        if pending:
            batch.count("stored", len(pending))

        try:
            seqs = self.store.commit(batch)
        except BaseException:
            for _, key in reversed(pending):
                near.remove(key)
            raise
        if seqs:  # our own records, without reading them back
            self.known_filter.add(
                [r[0] for r in batch.records] + [r[1] for r in batch.records]
            )
            if seqs[0] == self._filtered_upto + 1:  # else another writer came between
                self._filtered_upto = seqs[-1]
        for (pos, _), seq in zip(pending, seqs, strict=True):
            acks[pos] = Ack(STORED, "", seq)
        return [a for a in acks if a is not None]

    @staticmethod
    def _quarantine(batch: Batch, reason: str, source: str, raw: bytes) -> None:
        batch.quarantine.append((reason, source, raw))
        batch.count("quarantined")
        batch.count(f"quarantined:{reason}")
