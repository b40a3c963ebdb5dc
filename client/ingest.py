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

Near-duplicates are found with MinHash over word 3-grams (rensa's R-MinHash digests,
computed natively: the same bytes as the ``rensa`` package, tested) and a native
banded LSH index, within a horizon of the most recent records held in memory
(bounded by ``horizon``; rebuilt from the store after a restart).

The filter is refreshed before each batch with whatever another writer stored since;
a record another writer stores between that and the commit makes the commit refuse
(``Conflict``, nothing written) and the batch is decided again. ``submit_stream``
decides batch k+2 while batches k and k+1 commit, counting their records as stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

try:
    from client._native import KeyFilter, NearIndex, gather, gather_var
except ImportError:  # not built (a Flower App bundle ships sources): same, slower
    from client.near_py import (  # type: ignore[assignment]
        KeyFilter,
        NearIndex,
        gather,
        gather_var,
    )
from client.front import (
    DUP_CONTENT,
    DUP_ID,
    NUM_PERM,
    SKETCH_SEED,
    Front,
    Fronted,
    FrontPool,
    Pending,
    shingles,
    sketch_texts,
)
from client.gate import Gate, normalise
from client.store import Batch, Conflict, Store, StoreError

__all__ = ["DUPLICATE", "QUARANTINED", "STORED", "Ack", "Ingestor", "shingles"]

STORED, DUPLICATE, QUARANTINED = "STORED", "DUPLICATE", "QUARANTINED"
log = logging.getLogger(__name__)


class Ack(NamedTuple):
    status: str
    reason: str = ""
    seq: int = 0


_ALREADY_STORED = Ack(DUPLICATE, "already stored")
_CONFLICT_TRIES = 8  # another writer storing at the same moment: decide again
# 2**26 bits (8 MiB), 4 probes: false positives about 1 in 5,000 at a million stored
# records (two keys each), 1 in 4 at ten million; only the speed changes with them.
KNOWN_FILTER_LOG2, KNOWN_FILTER_K = 26, 4


class NearDuplicates:
    """Banded MinHash LSH over the last ``horizon`` records.

    Sketches of a batch are one ``(n, num_perm)`` uint32 matrix (bytes), computed
    natively (rensa's R-MinHash, bit for bit). The band index is native too
    (``client._native.NearIndex``). A record is a near-duplicate when it shares a
    whole band with a kept record whose sketch agrees with its own in at least
    ``threshold`` of the permutations.
    """

    def __init__(
        self,
        *,
        horizon: int,
        threshold: float,
        num_perm: int = NUM_PERM,
        bands: int = 16,
        seed: int = SKETCH_SEED,
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
        return sketch_texts(key_texts, self.num_perm, self.seed)

    def query(self, sketches: bytes, row: int = 0) -> bool:
        return self.index.query(sketches, row)

    def add(self, sketches: bytes, row: int = 0) -> int:
        """Index a sketch; returns its key (for ``remove``)."""
        return self.index.add(sketches, row)

    def remove(self, key: int) -> None:
        self.index.remove(key)

    def __len__(self) -> int:
        return len(self.index)


def _raw_bytes(raw: bytes | dict[str, Any]) -> bytes:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw)
    return json.dumps(raw, default=repr, ensure_ascii=False).encode("utf-8", "replace")


def _content_bytes(content: dict[str, Any], ts: float) -> bytes:
    obj = {**content, **({"ts": ts} if ts else {})}
    try:
        return orjson.dumps(obj)
    except TypeError:  # e.g. a lone surrogate: orjson refuses what json writes
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


Offsets = dict[str, str]


@dataclass
class _Prepared:
    """A batch checked and decided, its commit still to come."""

    items: list[tuple[bytes | dict[str, Any], str]]
    offsets: Offsets
    batch: Batch
    acks: list[Ack | None]  # set but for the records to store
    stored: list[int]  # their positions in items
    near_keys: list[int]  # their keys in the near-duplicate index
    want_acks: bool = True


class _Skipped(Exception):
    """A stream's commit not tried: the one before it failed."""


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
        workers: int = 0,
    ) -> None:
        """``workers``: processes that run the stateless half of a stream's batches
        (client.front) on other cores; 0: all in this process."""
        self.store = store
        self.gate = gate or Gate()
        self.near = NearDuplicates(horizon=horizon, threshold=near_threshold)
        self.front = Front(
            self.gate, store.keys, num_perm=self.near.num_perm, seed=self.near.seed
        )
        self.workers = workers
        self._pool: FrontPool | None = None
        self._depth = 2
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
            return self._submit(items, offsets or {})

    def submit_stream(
        self,
        batches: Iterable[
            tuple[list[tuple[bytes | dict[str, Any], str]], Offsets | None]
        ],
        *,
        acks: bool = True,
    ) -> Iterator[list[Ack] | None]:
        """``submit`` of each ``(items, offsets)`` batch, in order, yielding each
        batch's acks once it is committed (``acks=False``: None, for sources that
        need only to know that it is; the counters hold every record's fate).

        Batches commit in another thread, where SQLite and the disk wait without
        the GIL, up to ``_depth`` (2) at a time, one after the other: batch k+2 is
        checked and decided while k commits and k+1 waits its turn (measured: 8%
        faster than one at a time, which left the commit thread idle while this
        one decided). The decisions count the records of the batches in flight as
        stored: should a commit fail, nothing of the batches after it is written
        (each sees that the one before failed) and the error is raised; another
        writer storing meanwhile: those batches are decided again instead."""
        with self.lock, ThreadPoolExecutor(1, thread_name_prefix="commit") as pool:
            inflight: deque[tuple[Future[list[int]], _Prepared]] = deque()
            try:
                for items, offsets, fronted in self._fronted(batches):
                    prep = self._prepare(
                        items,
                        offsets,
                        after=[p for _, p in inflight],
                        fronted=fronted,
                    )
                    prep.want_acks = acks
                    redo = None
                    while inflight and (
                        len(inflight) >= self._depth or inflight[0][0].done()
                    ):
                        done = inflight.popleft()
                        try:
                            settled = self._settle(*done)
                        except Conflict:  # another writer: decided again, here
                            redo = [done[1], *(p for _, p in inflight), prep]
                            break
                        except BaseException:
                            self._undo(prep)
                            self._undo(done[1])
                            raise
                        yield settled
                    if redo is not None:
                        yield from self._redo(redo, inflight)
                        continue
                    prev = inflight[-1][0] if inflight else None
                    try:
                        write = self.store.begin_commit(prep.batch)
                    except BaseException:
                        self._undo(prep)
                        raise
                    inflight.append((pool.submit(self._commit, write, prev), prep))
                while inflight:
                    done = inflight.popleft()
                    try:
                        settled = self._settle(*done)
                    except Conflict:
                        yield from self._redo(
                            [done[1], *(p for _, p in inflight)], inflight
                        )
                        return
                    except BaseException:
                        self._undo(done[1])
                        raise
                    yield settled
            finally:
                # an error in the loop: the commits in flight end, and the state
                # stays true (each settled, or forgotten when it was not written)
                while inflight:
                    done = inflight.popleft()
                    try:
                        self._settle(*done)
                    except BaseException:
                        self._abandon([done[1], *(p for _, p in inflight)], inflight)

    @staticmethod
    def _commit(
        write: Callable[[], list[int]], prev: Future[list[int]] | None
    ) -> list[int]:
        """The commit thread's job: a batch's write (``Store.begin_commit``: one
        statement), unless the batch before it failed (then this one was decided
        on records that were not stored)."""
        if prev is not None and prev.exception() is not None:
            raise _Skipped
        return write()

    def _abandon(
        self,
        preps: list[_Prepared],
        inflight: deque[tuple[Future[list[int]], _Prepared]],
    ) -> None:
        """Forget batches that are not written (newest first), and wait out the
        commits still in flight: each is refused, as the one before it failed."""
        for prep in reversed(preps):
            self._undo(prep)
        while inflight:
            future, _ = inflight.popleft()
            with contextlib.suppress(Exception):  # refused, or failed: raised before
                future.result()

    def _redo(
        self,
        preps: list[_Prepared],
        inflight: deque[tuple[Future[list[int]], _Prepared]],
    ) -> Iterator[list[Ack]]:
        """Another writer stored meanwhile: these batches, which were not
        written, are decided again and committed one at a time."""
        self._abandon(preps, inflight)
        for prep in preps:
            yield self._submit(prep.items, prep.offsets)

    def _fronted(
        self,
        batches: Iterable[
            tuple[list[tuple[bytes | dict[str, Any], str]], Offsets | None]
        ],
    ) -> Iterator[
        tuple[list[tuple[bytes | dict[str, Any], str]], Offsets, Fronted | None]
    ]:
        """The batches with their stateless half done by the workers, up to
        ``workers + 1`` batches ahead (None: done here, when there are none)."""
        if not self.workers:
            for items, offsets in batches:
                yield items, offsets or {}, None
            return
        self.start_workers()
        pool = self._pool
        assert pool is not None
        source = iter(batches)
        ahead: deque[tuple[Any, Offsets, Pending | None]] = deque()

        def fill(upto: int) -> None:
            while len(ahead) < upto:
                nxt = next(source, None)
                if nxt is None:
                    return
                items, offsets = nxt
                pending = None
                if self._pool is pool:
                    try:
                        pending = pool.submit([raw for raw, _ in items])
                    except Exception as err:  # the pool broke: done here
                        lost(err)
                ahead.append((items, offsets or {}, pending))

        def lost(err: Exception) -> None:
            log.warning("ingest worker failed (%s); checking batches here", err)
            if self._pool is pool:
                self._pool = None
                pool.close()

        fill(1)
        while ahead:
            items, offsets, pending = ahead.popleft()
            fill(self.workers + 1)  # the workers stay busy while this one is decided
            fronted: Fronted | None = None
            try:
                fronted = pool.result(pending) if pending is not None else None
            except Exception as err:  # a worker lost: the same function, here
                lost(err)
            yield items, offsets, fronted

    def start_workers(self) -> None:
        """Start the worker processes now (else the first stream starts them) and
        wait until they are ready."""
        if self.workers and self._pool is None:
            self._pool = FrontPool(self.front, self.workers)
            for pending in [self._pool.submit([]) for _ in range(self.workers)]:
                self._pool.result(pending)

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _submit(
        self, items: list[tuple[bytes | dict[str, Any], str]], offsets: Offsets
    ) -> list[Ack]:
        for _ in range(_CONFLICT_TRIES):
            prep = self._prepare(items, offsets)
            try:
                seqs = self.store.commit(prep.batch)
            except Conflict:  # nothing written; the filter catches up first
                self._undo(prep)
                continue
            except BaseException:
                self._undo(prep)
                raise
            acks = self._finish(prep, seqs)
            assert acks is not None  # a prepared batch wants its acks by default
            return acks
        raise StoreError(
            f"another writer kept storing records in {self.store.path}: gave up "
            f"after {_CONFLICT_TRIES} tries, nothing of this batch was written"
        )

    def _settle(self, future: Future[list[int]], prep: _Prepared) -> list[Ack] | None:
        return self._finish(prep, future.result())

    def _undo(self, prep: _Prepared) -> None:
        """Forget a batch that was not committed: its records leave the horizon."""
        for key in reversed(prep.near_keys):
            self.near.remove(key)

    def _finish(self, prep: _Prepared, seqs: list[int]) -> list[Ack] | None:
        batch = prep.batch
        if seqs:  # our own records, without reading them back
            self.known_filter.add(batch.rids)
            self.known_filter.add(batch.chashes)
            if seqs[0] == self._filtered_upto + 1:  # else another writer came between
                self._filtered_upto = seqs[-1]
        if not prep.want_acks:
            return None
        acks, make = prep.acks, Ack._make
        for pos, seq in zip(prep.stored, seqs, strict=True):
            acks[pos] = make((STORED, "", seq))
        return acks  # type: ignore[return-value]  # every position is set

    def _prepare(
        self,
        items: list[tuple[bytes | dict[str, Any], str]],
        offsets: Offsets,
        *,
        after: list[_Prepared] | None = None,
        fronted: Fronted | None = None,
    ) -> _Prepared:
        """Everything of ``submit`` but the commit. ``after``: batches whose
        commits are in flight, in order; their records count as stored.
        ``fronted``: the stateless half, done already (by a worker)."""
        # (No yielding of the GIL to the commit thread here: with the switch
        # interval at 0.2 ms (client.front.tune_process) and two commits in flight,
        # time.sleep(0) at two points cost 5% in side-by-side runs.)
        batch = Batch(offsets=dict(offsets))
        if items:
            batch.count("received", len(items))
        acks: list[Ack | None] = [None] * len(items)
        fr = fronted or self.front.run([raw for raw, _ in items])
        for pos, reason in fr.rejected:
            raw, source = items[pos]
            self._quarantine(batch, reason, source, _raw_bytes(raw))
            acks[pos] = Ack(QUARANTINED, reason)
        passed, rids, chashes = fr.passed, fr.rids, fr.chashes  # 16-byte keys, blobs

        # Decided against what is stored up to ``decided_at``: a record stored by
        # another writer after it makes the commit raise Conflict, and the batch is
        # decided again.
        if not after:
            top = self.store.high_water()
            if top > self._filtered_upto:
                self._load_known(top)  # stored since (by us, or by another process)
        else:  # what the batches in flight will have stored
            last = after[-1].batch
            assert last.decided_at is not None
            top = last.decided_at + len(last.tss)
        batch.decided_at = top
        maybe = self.known_filter.maybe
        known_rids = self.store.known(maybe(rids))
        maybe_content = maybe(chashes)
        if known_rids and maybe_content:
            # A record whose id is stored is a duplicate by id, whatever its
            # content: look up only the content of the others (a redelivery's
            # content hash is in the filter too: half the lookups of a replay).
            others = {
                chashes[16 * j : 16 * j + 16]
                for j in range(len(chashes) // 16)
                if rids[16 * j : 16 * j + 16] not in known_rids
            }
            maybe_content = [c for c in maybe_content if c in others]
        known_content = self.store.content_known(maybe_content)
        # Each kept record is indexed as it is decided, so later records of the
        # batch see it; removed again if the commit fails. The records of the
        # batches in flight count as stored.
        decided = self.near.index.decide(
            fr.sketches,
            rids,
            chashes,
            known_rids,
            known_content,
            b"".join([p.batch.rids for p in after]) if after else b"",
            b"".join([p.batch.chashes for p in after]) if after else b"",
        )
        keep = [j for j, v in enumerate(decided) if v >= 0]
        if len(keep) < len(passed):
            for j, v in enumerate(decided):
                if v == DUP_ID:
                    batch.count("duplicates")
                    acks[passed[j]] = _ALREADY_STORED
                elif v < 0:
                    reason = "duplicate" if v == DUP_CONTENT else "near_duplicate"
                    source = items[passed[j]][1]
                    content = self.store._open(fr.payload(j), fr.rid(j))
                    raw = _content_bytes(content, fr.tss[j])
                    self._quarantine(batch, reason, source, raw)
                    acks[passed[j]] = Ack(QUARANTINED, reason)
        batch.rids = gather(rids, 16, keep)
        batch.chashes = gather(chashes, 16, keep)
        batch.groups = gather(fr.groups, 16, keep)
        tss = fr.tss
        batch.tss = [tss[j] for j in keep]
        batch.payloads, batch.lengths = gather_var(fr.payloads, fr.starts, keep)
        for j, kind, n in zip(fr.pii_at, fr.pii_kinds, fr.pii_counts, strict=True):
            if decided[j] >= 0:  # kept
                batch.count(f"pii:{kind}", n)
        if keep:
            batch.count("stored", len(keep))
        return _Prepared(
            items=items,
            offsets=offsets,
            batch=batch,
            acks=acks,
            stored=[passed[j] for j in keep],
            near_keys=[decided[j] for j in keep],
        )

    @staticmethod
    def _quarantine(batch: Batch, reason: str, source: str, raw: bytes) -> None:
        batch.quarantine.append((reason, source, raw))
        batch.count("quarantined")
        batch.count(f"quarantined:{reason}")
