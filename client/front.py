"""The stateless half of ingestion, which may run in worker processes.

For a batch of raw inputs, everything that depends only on the inputs, the gate's
settings and the store key: the gate (checks, PII scrubbing), the keyed hashes
(content, producer id, balancing group), the MinHash sketches of the key texts and
the sealed payloads (AES-GCM, the rid as associated data). The stateful half, the
dedup decisions against the store and the near-duplicate horizon and the commit,
stays in the ingesting process (client.ingest).

``Front.run`` is that function; ``FrontPool`` runs it in spawned worker processes,
so that a stream's next batches are checked on other cores while this process
decides and commits (``Ingestor.submit_stream``). A worker holds the store key (it
seals) and nothing else of the store; it gets the key through its start-up pipe.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import multiprocessing
import os
import pickle
import re
import sys
import threading
import time
from array import array
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

from client.gate import Clean, Gate, GateSettings
from client.store import Keys

# NearIndex.decide's verdicts other than a key (>= 0), native and Python alike
DUP_NEAR, DUP_ID, DUP_CONTENT = -1, -2, -3

try:
    from client._native import front_batch, gather, gather_var, record_keys, sketches
except ImportError:  # not built (a Flower App bundle ships sources): same, slower
    from client.near_py import (  # type: ignore[assignment]
        gather,
        gather_var,
        sketches,
    )

    front_batch = None  # type: ignore[assignment]
    record_keys = None  # type: ignore[assignment]

__all__ = [
    "DUP_CONTENT",
    "DUP_ID",
    "DUP_NEAR",
    "NUM_PERM",
    "SKETCH_SEED",
    "Front",
    "FrontPool",
    "Fronted",
    "shingles",
    "tune_process",
]

NUM_PERM, SKETCH_SEED = 128, 17
_PUNCT = re.compile(r"[^\w\s]+")


def shingles(key_text: str) -> list[str]:
    """Word 3-grams ("costs." and "costs" are one word); the whole text if shorter."""
    w = _PUNCT.sub(" ", key_text).split()
    if len(w) < 3:
        return [" ".join(w)]
    return list(map(" ".join, zip(w, w[1:], w[2:], strict=False)))


def sketch_texts(key_texts: list[str], num_perm: int, seed: int) -> bytes:
    """``(len(key_texts), num_perm)`` uint32 MinHash digests, row-major."""
    # ASCII texts are cut into shingles natively (words are the [A-Za-z0-9_] runs
    # there); others need Unicode word characters, so Python cuts them.
    return sketches(
        [t if t.isascii() else shingles(t) for t in key_texts], num_perm, seed
    )


@dataclass
class Fronted:
    """A batch through the stateless half; ``j`` indexes the inputs that passed.
    Columns are blobs (few objects to pass between processes): 16-byte keyed
    hashes back to back, payloads back to back with their start offsets."""

    rejected: list[tuple[int, str]]  # (position, reason) of the gate's rejections
    passed: list[int]  # positions of the rest, in order
    rids: bytes  # keyed hash of the producer id, else of the content
    chashes: bytes  # keyed hash of the normalised content
    groups: bytes  # keyed hash of the label, else of the first tag
    tss: array[float]  # 0 = time of arrival
    # PII replacements, one entry per (record, kind) where there were any, as
    # columns (a dict per record cost the ingesting process 0.6 us a record to
    # unpickle: 3.5% of a stream): record j, kind, count
    pii_at: array[int]
    pii_kinds: list[str]
    pii_counts: array[int]
    sketches: bytes  # (len(passed), num_perm) uint32
    payloads: bytes  # nonce || AES-GCM(content as JSON), aad = rid; back to back
    starts: array[int]  # payload j is payloads[starts[j]:starts[j + 1]]

    def rid(self, j: int) -> bytes:
        return self.rids[16 * j : 16 * j + 16]

    def payload(self, j: int) -> bytes:
        return self.payloads[self.starts[j] : self.starts[j + 1]]


def _doubles(blob: bytes) -> array[float]:
    out = array("d")
    out.frombytes(blob)
    return out


class Front:
    def __init__(
        self,
        gate: Gate,
        keys: Keys,
        *,
        num_perm: int = NUM_PERM,
        seed: int = SKETCH_SEED,
    ) -> None:
        self.gate, self.keys = gate, keys
        self.num_perm, self.seed = num_perm, seed

    def run(self, raws: list[bytes | dict[str, Any]]) -> Fronted:
        """The batch's stateless half: the usual records (the gate's fast shape,
        no PII to scrub) in one native pass (client._native.front_batch: the same
        columns, tested), the rest through the gate's exact path; merged in the
        inputs' order."""
        s = self.gate.settings
        if front_batch is None or self.gate.scrubber.n_extra or not raws:
            return self._run(raws)
        done = front_batch(
            raws,
            s.max_raw_bytes,
            s.max_text_bytes,
            s.max_tags,
            s.max_field_chars,
            self.keys.mac,
            self.keys.key,
            os.urandom(12 * len(raws)),  # one an input; the rest draw their own
            self.num_perm,
            self.seed,
        )
        if done is None:  # no libcrypto
            return self._run(raws)
        at = array("I")
        at.frombytes(done[0])
        cuts = array("Q")
        cuts.frombytes(done[7])
        native = Fronted(
            rejected=[],
            passed=at.tolist(),
            rids=done[1],
            chashes=done[2],
            groups=done[3],
            tss=_doubles(done[4]),
            pii_at=array("I"),
            pii_kinds=[],
            pii_counts=array("I"),
            sketches=done[5],
            payloads=done[6],
            starts=cuts,
        )
        if len(at) == len(raws):
            return native
        fast = set(at)
        rest = [pos for pos in range(len(raws)) if pos not in fast]
        return self._merge(native, rest, self._run([raws[pos] for pos in rest]))

    def _merge(self, native: Fronted, rest: list[int], other: Fronted) -> Fronted:
        """One batch's Fronted from the native pass's and the exact path's (over
        the inputs at ``rest``), in the inputs' order."""
        other_passed = [rest[j] for j in other.passed]
        passed = sorted(native.passed + other_passed)
        k = len(native.passed)
        where = {pos: j for j, pos in enumerate(native.passed)}
        where.update((pos, k + j) for j, pos in enumerate(other_passed))
        order = [where[pos] for pos in passed]
        new_j = {src: j for j, src in enumerate(order)}
        tail = native.starts[-1]
        starts = array("Q", native.starts)
        starts.extend(tail + x for x in other.starts[1:])
        payloads, lengths = gather_var(native.payloads + other.payloads, starts, order)
        width = self.num_perm * 4
        return Fronted(
            rejected=[(rest[j], reason) for j, reason in other.rejected],
            passed=passed,
            rids=gather(native.rids + other.rids, 16, order),
            chashes=gather(native.chashes + other.chashes, 16, order),
            groups=gather(native.groups + other.groups, 16, order),
            tss=_doubles(gather(native.tss.tobytes() + other.tss.tobytes(), 8, order)),
            pii_at=array("I", [new_j[k + j] for j in other.pii_at]),
            pii_kinds=other.pii_kinds,
            pii_counts=other.pii_counts,
            sketches=gather(native.sketches + other.sketches, width, order),
            payloads=payloads,
            starts=array("Q", itertools.accumulate(lengths, initial=0)),
        )

    def _run(self, raws: list[bytes | dict[str, Any]]) -> Fronted:
        """The exact path: the gate, then each step over the clean records."""
        verdicts = self.gate.inspect_many(raws)
        passed = [pos for pos, v in enumerate(verdicts) if type(v) is Clean]
        rejected = []
        if len(passed) < len(raws):
            rejected = [
                (pos, v.reason)  # type: ignore[union-attr]
                for pos, v in enumerate(verdicts)
                if type(v) is not Clean
            ]
        cleans: list[Clean] = [verdicts[pos] for pos in passed]  # type: ignore[misc]
        contents = [c.content for c in cleans]
        key_texts = [c.key_text for c in cleans]
        if record_keys is not None:
            rids, chashes, groups, tss = record_keys(self.keys.mac, cleans)
        else:
            rids, chashes, groups, tss = self._keys(cleans)
        payloads, starts = self.keys.seal_batch(contents, rids)
        pii_at, pii_kinds, pii_counts = array("I"), [], array("I")
        for j, c in enumerate(cleans):
            if c.pii:
                for kind, n in c.pii.items():
                    pii_at.append(j)
                    pii_kinds.append(kind)
                    pii_counts.append(n)
        return Fronted(
            rejected=rejected,
            passed=passed,
            rids=rids,
            chashes=chashes,
            groups=groups,
            tss=array("d", tss),
            pii_at=pii_at,
            pii_kinds=pii_kinds,
            pii_counts=pii_counts,
            sketches=sketch_texts(key_texts, self.num_perm, self.seed),
            payloads=payloads,
            starts=starts,
        )

    def _keys(self, cleans: list[Clean]) -> tuple[bytes, bytes, bytes, bytes]:
        """As client._native.record_keys: content hash, producer id (else the
        content's), balancing group (label, else first tag), and the ts."""
        contents = [c.content for c in cleans]
        hashes = self.keys.keyed_hashes
        chashes = hashes(b"c:", [c.key_text for c in cleans])
        rids = list(chashes)
        with_id = [j for j, c in enumerate(contents) if "id" in c]
        if with_id:
            ids = hashes(b"i:", [contents[j]["id"] for j in with_id])
            for j, rid in zip(with_id, ids, strict=True):
                rids[j] = rid
        names = [c.get("label") or next(iter(c.get("tags", ())), "") for c in contents]
        distinct = list(dict.fromkeys(names))
        by_name = dict(zip(distinct, hashes(b"g:", distinct), strict=True))
        return (
            b"".join(rids),
            b"".join(chashes),
            b"".join([by_name[n] for n in names]),
            array("d", [c.ts for c in cleans]).tobytes(),
        )


def tune_process() -> None:
    """CPython settings for an ingesting process (the agent, its workers; the bench
    as the agent). The cyclic GC: a batch allocates thousands of short-lived
    containers (none cyclic), and the default gen-0 threshold (700 allocations)
    runs a collection several times a batch (measured: 8% of a stream's time), so
    collect every 50,000, with what was loaded at start moved out of the
    collector's way (gc.freeze). The GIL's switch interval: the commit thread and
    the worker pool's threads need the GIL only briefly, but wait up to the
    interval for it while the ingesting thread runs; 0.2 ms instead of 5 (measured:
    0.5 ms saved 10% of a stream's time against 5 ms, and 0.2 ms 4-11% more
    against 0.5 in four side-by-side runs; 0.1 ms was no better)."""
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)
    sys.setswitchinterval(0.0002)


_FIELDS = tuple(Fronted.__dataclass_fields__)


def _serve(
    requests: Connection,
    results: Connection,
    settings: GateSettings,
    keys: Keys,
    num_perm: int,
    seed: int,
    parent: int,
) -> None:
    """A worker: ``Front.run`` of each request, answered in order, until the
    ingesting process closes its end (or dies)."""
    front = Front(Gate(settings), keys, num_perm=num_perm, seed=seed)
    tune_process()
    # A worker outlives nothing: when the ingesting process dies (kill -9 too), its
    # end of the pipe closes, and a worker busy with a batch sees it within half a
    # second. (Not the kernel's parent-death signal: that follows the thread that
    # spawned the worker, not the process.)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    while True:
        try:
            seq, raws = pickle.loads(requests.recv_bytes())
        except (EOFError, OSError):
            return
        answer: tuple[int, bool, Any]
        try:
            fr = front.run(raws)
            answer = (seq, True, tuple(getattr(fr, f) for f in _FIELDS))
        except Exception as err:  # the ingesting process does the batch itself
            answer = (seq, False, f"{type(err).__name__}: {err}")
        results.send_bytes(pickle.dumps(answer, protocol=5))


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


_PIPE_BYTES = 1 << 20


def _widen(conn: Connection) -> None:
    """Room in the pipe for whole batches: a batch's results (about 200 KB of 256
    records: sketches are 512 bytes a record) would fill a pipe of the default
    64 KB three times over, the worker waiting in its write until this process
    reads (Linux: F_SETPIPE_SZ, up to pipe-max-size, 1 MiB by default). Elsewhere,
    or where it is refused, the pipe stays as it is (slower, the same results)."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if setpipe is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(conn.fileno(), setpipe, _PIPE_BYTES)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    requests: Connection  # this end writes
    results: Connection  # this end reads
    sent: int = 0  # requests sent (each answer carries its request's number)


@dataclass(frozen=True)
class Pending:
    """A batch handed to a worker: ``FrontPool.result`` gets its answer."""

    worker: int
    seq: int


class FrontPool:
    """``Front.run`` in ``workers`` spawned processes (spawned, not forked: the
    agent has gRPC threads), each with a pipe each way and no threads of ours:
    a batch goes out as one pickled message from the ingesting thread and its
    answer is read there when it is needed (measured against a
    ProcessPoolExecutor, whose feeder and manager threads pickled, read and woke
    this process's threads each batch: see bench/RESULTS.md). Batches go to the
    workers in turn; each worker answers in order.

    A worker that dies is noticed by the end of its result pipe (this process
    keeps no copy of the worker's ends): ``result`` raises ``BrokenProcessPool``
    then, also for an answer cut off half-way, and the caller checks the batch
    itself."""

    def __init__(self, front: Front, workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._turn = 0
        try:
            for _ in range(workers):
                req_r, req_w = ctx.Pipe(duplex=False)
                res_r, res_w = ctx.Pipe(duplex=False)
                for conn in (req_w, res_r):
                    _widen(conn)
                proc = ctx.Process(
                    target=_serve,
                    args=(
                        req_r,
                        res_w,
                        front.gate.settings,
                        front.keys,
                        front.num_perm,
                        front.seed,
                        os.getpid(),
                    ),
                    daemon=True,
                    name="fedstream-ingest-worker",
                )
                proc.start()
                req_r.close()  # the worker's ends: only the worker holds them
                res_w.close()
                self._workers.append(_Worker(proc, req_w, res_r))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def submit(self, raws: list[bytes | dict[str, Any]]) -> Pending:
        """Hand ``raws`` to the next worker; raises ``BrokenProcessPool`` when it
        is gone."""
        if not self._workers:
            raise BrokenProcessPool("the ingest workers are closed")
        index = self._turn
        self._turn = (index + 1) % len(self._workers)
        w = self._workers[index]
        try:
            w.requests.send_bytes(pickle.dumps((w.sent, raws), protocol=5))
        except OSError as err:
            raise BrokenProcessPool(f"ingest worker {w.process.pid} is gone") from err
        w.sent += 1
        return Pending(index, w.sent - 1)

    def result(self, pending: Pending) -> Fronted:
        """The answer to ``pending`` (answers to batches handed over before it and
        not asked for, by a stream that stopped early, are read and dropped)."""
        w = self._workers[pending.worker] if self._workers else None
        if w is None:
            raise BrokenProcessPool("the ingest workers are closed")
        while True:
            try:
                while not w.results.poll(0.25):
                    if not w.process.is_alive() and not w.results.poll(0):
                        raise EOFError
                seq, ok, answer = pickle.loads(w.results.recv_bytes())
            except (EOFError, OSError) as err:  # dead, possibly half-way through
                raise BrokenProcessPool(
                    f"ingest worker {w.process.pid} died (exit code "
                    f"{w.process.exitcode})"
                ) from err
            if seq < pending.seq:
                continue
            if not ok:
                raise RuntimeError(f"ingest worker failed: {answer}")
            return Fronted(*answer)

    def close(self) -> None:
        """Stop the workers: each sees its request pipe close and exits."""
        workers, self._workers = self._workers, []
        for w in workers:
            w.requests.close()
        for w in workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.results.close()
