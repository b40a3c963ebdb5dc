"""Ingestor.submit_stream: batch k+2 decided while batches k and k+1 commit, with
the same decisions as one submit a batch, and nothing wrong left behind when a
commit fails."""

import fcntl
import json

import pytest

from client.ingest import Ingestor
from client.store import Conflict, QuotaExceeded, Store, load_key


def _open(tmp_path, name="store.db", **kw):
    return Store(tmp_path / name, load_key(tmp_path / "store.key"), **kw)


def _batches(n_batches=6, size=40):
    """Records with redeliveries and copies inside and across batch boundaries, and
    near-duplicates of records in the batch before."""
    out = []
    for b in range(n_batches):
        batch = [
            {
                "text": f"shift {b} note {i}: patient in ward {i % 7} is stable, "
                f"observations every {i % 5 + 1} hours",
                "id": f"b{b}.{i}",
            }
            for i in range(size)
        ]
        if b:
            prev = out[-1]
            batch[0] = prev[-1]  # redelivered from the batch in flight
            batch[1] = {"text": prev[-2]["text"], "id": f"copy{b}"}  # its content
            batch[2] = {"text": prev[-3]["text"] + " ok", "id": f"near{b}"}  # near
            batch[3] = batch[4]  # redelivered within the batch
        if b >= 2:  # redelivered from two batches back (also in flight)
            batch[5] = out[-2][-4]
            batch[6] = {"text": out[-2][-5]["text"], "id": f"copy2.{b}"}
        out.append(batch)
    return [[(json.dumps(r).encode(), "t") for r in batch] for batch in out]


def _summary(acks):
    return [(a.status, a.reason, a.seq) for a in acks]


def test_stream_decides_exactly_as_one_submit_a_batch(tmp_path):
    batches = _batches()
    unary = Ingestor(_open(tmp_path, "u.db"))
    stream = Ingestor(_open(tmp_path, "s.db"))
    one_by_one = [_summary(unary.submit(b)) for b in batches]
    streamed = [_summary(a) for a in stream.submit_stream((b, None) for b in batches)]
    assert streamed == one_by_one
    reasons = {r for batch in streamed for _, r, _ in batch}
    assert {"already stored", "duplicate", "near_duplicate", ""} <= reasons
    assert stream.store.counters() == unary.store.counters()
    assert [r.content for r in stream.store.iter_records()] == [
        r.content for r in unary.store.iter_records()
    ]


def test_a_failed_commit_in_a_stream_leaves_nothing_of_the_next_batch(tmp_path):
    """Batch 3's commit fails on the disk while batch 4 is decided: the error comes
    out, batches 1-2 are stored, and batches 3-4 can be stored afterwards (nothing of
    them stays in the filter or the near-duplicate horizon)."""
    batches = _batches(5)
    store = _open(tmp_path)
    ing = Ingestor(store)
    real = store.begin_commit
    calls = []

    def begin(batch):
        finish = real(batch)
        calls.append(len(batch.tss))
        if len(calls) != 3:
            return finish

        def broken():  # as finish() when the disk fails: nothing written, raised
            raise OSError("disk I/O error")

        return broken

    store.begin_commit = begin
    got = []
    with pytest.raises(OSError, match="disk I/O error"):
        for acks in ing.submit_stream((b, None) for b in batches):
            got.append(acks)
    assert len(got) == 2
    store.begin_commit = real
    assert store.count() == sum(a.status == "STORED" for acks in got for a in acks)
    again = ing.submit(batches[2]) + ing.submit(batches[3])
    assert [(a.status, a.reason) for a in again] == _reference(tmp_path, batches, 2, 4)


def _reference(tmp_path, batches, start, stop):
    """(status, reason) of batches[start:stop] after batches[:start], one submit a
    batch into a fresh store."""
    fresh = Ingestor(_open(tmp_path, f"ref{start}.db"))
    for b in batches[:start]:
        fresh.submit(b)
    return [(a.status, a.reason) for b in batches[start:stop] for a in fresh.submit(b)]


def test_quota_reached_in_a_stream_stops_it_with_nothing_half_written(tmp_path):
    batches = _batches(4)
    probe = Ingestor(_open(tmp_path, "probe.db"))
    for b in batches[:2]:
        probe.submit(b)
    store = _open(tmp_path, quota_bytes=probe.store.bytes_used() + 1000)
    ing = Ingestor(store)
    got = []
    with pytest.raises(QuotaExceeded):
        for acks in ing.submit_stream((b, None) for b in batches):
            got.append(acks)
    assert len(got) == 2
    stored = store.count()
    store.quota_bytes = 0
    acks = ing.submit(batches[2])  # none lost to a phantom of the refused batch
    assert [(a.status, a.reason) for a in acks] == _reference(tmp_path, batches, 2, 3)
    assert store.count() == stored + sum(a.status == "STORED" for a in acks) > stored


def test_a_writer_storing_as_many_records_as_a_failed_batch_still_fails_the_next(
    tmp_path,
):
    """Batch 1's commit meets another writer's records (Conflict) while batch 2,
    decided as if batch 1 were stored, waits behind it. The writer stored exactly
    as many records as batch 1 would have, so batch 2's own check of the high-water
    mark would pass: it must be refused all the same (its predecessor failed) and
    decided again, else a record the writer stored is stored twice."""
    batches = _batches(3)
    store = _open(tmp_path)
    other = Ingestor(_open(tmp_path))
    ing = Ingestor(store)
    real = store.begin_commit
    n_first = sum(
        a.status == "STORED"
        for a in Ingestor(_open(tmp_path, "p.db")).submit(batches[0])
    )
    raced = []

    fresh = [
        (
            json.dumps(
                {"text": f"other writer {i}: pump {i} serviced", "id": f"o{i}"}
            ).encode(),
            "o",
        )
        for i in range(n_first - 1)
    ]

    def begin(batch):
        finish = real(batch)

        def write():  # batch 2's record 10 and others, as many as batch 1 stores
            if not raced:
                raced.append(other.submit([batches[1][10], *fresh]))
                assert sum(a.status == "STORED" for a in raced[0]) == n_first
            return finish()

        return write

    store.begin_commit = begin
    out = list(ing.submit_stream((b, None) for b in batches))
    assert [len(a) for a in out] == [len(b) for b in batches]
    assert out[1][10].status == "DUPLICATE"
    rows = store.db.execute("SELECT COUNT(*), COUNT(DISTINCT rid) FROM records")
    total, distinct = rows.fetchone()
    assert total == distinct
    counters = store.counters()
    assert counters["received"] == n_first + sum(map(len, batches))
    assert store.count() == n_first + sum(
        a.status == "STORED" for acks in out for a in acks
    )
    assert counters["received"] == (
        counters["stored"] + counters.get("duplicates", 0) + counters["quarantined"]
    )


def test_a_source_failing_mid_stream_still_settles_the_commit_in_flight(tmp_path):
    """The batch iterator raises while commits are in flight: they complete and
    their records count as stored (a redelivery of them is a duplicate)."""
    batches = _batches(3)

    def source():
        yield batches[0], None
        yield batches[1], None
        raise ConnectionError("broker gone")

    ing = Ingestor(_open(tmp_path))
    seen = []
    with pytest.raises(ConnectionError):
        for acks in ing.submit_stream(source()):
            seen.append(acks)
    assert seen == []  # both batches were in flight: committed, acks not handed out
    stored = ing.store.count()
    assert stored == sum(s == "STORED" for s, _ in _reference(tmp_path, batches, 0, 2))
    again = ing.submit(batches[1])
    assert {a.status for a in again} <= {"DUPLICATE", "QUARANTINED"}
    assert ing.store.count() == stored


def test_another_writer_storing_during_a_stream_is_decided_again(tmp_path):
    batches = _batches(3)
    store = _open(tmp_path)
    other = Ingestor(_open(tmp_path))
    ing = Ingestor(store)
    real = store.begin_commit
    conflicts = []

    def begin(batch):
        finish = real(batch)

        def write():
            if not conflicts:  # the other writer stores batch 2's first record first
                other.submit(batches[1][5:6])
            try:
                return finish()
            except Conflict:
                conflicts.append(1)
                raise

        return write

    store.begin_commit = begin
    out = list(ing.submit_stream((b, None) for b in batches))
    assert conflicts == [1]
    assert out[1][5].status == "DUPLICATE"
    rows = store.db.execute("SELECT COUNT(*), COUNT(DISTINCT rid) FROM records")
    assert (
        rows.fetchone()[0]
        == store.db.execute("SELECT COUNT(DISTINCT rid) FROM records").fetchone()[0]
    )


def test_a_stream_through_worker_processes_decides_the_same(tmp_path):
    """workers=1: the stateless half of each batch runs in a spawned process, ahead;
    the decisions, acks and stored records are those of one submit a batch. A
    worker killed mid-stream: the rest is checked in this process, nothing lost."""
    import os
    import signal

    batches = _batches(8)
    unary = Ingestor(_open(tmp_path, "u.db"))
    expected = [_summary(unary.submit(b)) for b in batches]
    stream = Ingestor(_open(tmp_path, "s.db"), workers=1)
    try:
        stream.start_workers()
        if hasattr(fcntl, "F_GETPIPE_SZ"):  # Linux: a batch's results fit the pipe
            (worker,) = stream._pool._workers
            for conn in (worker.requests, worker.results):
                size = fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ)
                assert size >= 1 << 20
        got = []
        for i, acks in enumerate(stream.submit_stream((b, None) for b in batches)):
            got.append(_summary(acks))
            if i == 2:
                for pid in stream._pool.pids:
                    os.kill(pid, signal.SIGKILL)
        assert got == expected
        assert stream._pool is None and stream.workers == 1  # restarted next stream
        assert [r.content for r in stream.store.iter_records()] == [
            r.content for r in unary.store.iter_records()
        ]
    finally:
        stream.close()


_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from client.ingest import Ingestor
from client.store import Store, load_key
def main():
    ing = Ingestor(Store(Path(sys.argv[2]) / "w.db", load_key(Path(sys.argv[2]) / "k")),
                   workers=1)
    ing.start_workers()
    print(*ing._pool.pids, flush=True)
    time.sleep(60)
if __name__ == "__main__":
    main()
"""


def test_workers_exit_when_the_ingesting_process_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    root = str(Path(__file__).resolve().parents[2])
    holder = subprocess.Popen(
        [sys.executable, str(script), root, str(tmp_path)], stdout=subprocess.PIPE
    )
    try:
        workers = [int(p) for p in holder.stdout.readline().split()]
        assert workers
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 10
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _alive(p)]
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        if holder.poll() is None:
            holder.kill()


def _alive(pid):
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited
        return fh.read().split(") ")[1][0] != "Z"


def test_native_record_keys_are_the_python_keyed_hashes(tmp_path):
    """client._native.record_keys (the workers' keyed hashes of a batch) gives the
    bytes of client.front's Python path: content hash, id hash or the content's,
    group of the label or first tag (or none), ts."""
    import os

    from client._native import record_keys
    from client.front import Front
    from client.gate import Gate
    from client.store import Keys

    raws = [
        json.dumps(r).encode()
        for r in [
            {"text": "a note on ward rounds", "id": "n1", "label": "clinical"},
            {"text": "a note on ward rounds", "tags": ["a", "b"], "ts": 12.5},
            {"text": "café au lait", "tags": []},  # not ASCII: the gate's own path
            {"prompt": "question?", "response": "answer", "id": 7},
            {"text": "mail me at a@b.io", "label": "x", "tags": ["t"]},
            {"text": "plain"},
        ]
    ]
    front = Front(Gate(), Keys(os.urandom(32)))
    verdicts = front.gate.inspect_many(raws)
    assert all(type(v).__name__ == "Clean" for v in verdicts)
    native = record_keys(front.keys.mac, verdicts)
    assert native == front._keys(verdicts)
    fronted = front.run(raws)
    assert fronted.rids == native[0] and fronted.groups == native[2]
    assert fronted.rid(1) == fronted.chashes[16:32]  # no id: the content's hash
    with pytest.raises(TypeError):
        record_keys(front.keys.mac, [("not", "a", "record")])


def test_pii_counters_count_the_stored_records_only(tmp_path):
    """pii:<KIND> counters add up the replacements in the records that are stored
    (a redelivered or near-duplicate record's PII is not counted twice), streamed
    and one batch a call alike."""
    records = [
        {
            "text": f"note {i}: call +44 20 7946 {i:04d} or mail u{i}@example.com",
            "id": f"p{i}",
        }
        for i in range(30)
    ]
    records += [records[3], records[7]]  # redelivered: not stored again
    records += [{"text": "no personal data in this one at all", "id": "q"}]
    batch = [(json.dumps(r).encode(), "t") for r in records]
    unary = Ingestor(_open(tmp_path, "u.db"))
    stream = Ingestor(_open(tmp_path, "s.db"))
    unary.submit(batch[:16])
    unary.submit(batch[16:])
    list(stream.submit_stream([(batch[:16], None), (batch[16:], None)]))
    for ing in (unary, stream):
        c = ing.store.counters()
        assert c["stored"] == 31 and c["duplicates"] == 2
        assert c["pii:EMAIL"] == 30 and c["pii:PHONE"] == 30


def test_a_worker_killed_mid_answer_fails_the_batch_instead_of_hanging(tmp_path):
    """A worker killed while it writes its result leaves half a message in the
    result pipe; a reader waiting for the rest would wait forever. FrontPool.result
    sees the pipe's end (this process holds no copy of the worker's end) and raises
    (the stream then checks the batch itself) instead of hanging. The half message
    is made by hand: the worker is stopped, a message header promising 1,000 bytes
    is written into its result pipe (opened through /proc), then it is killed."""
    import os
    import signal
    import stat
    import struct
    import time
    from concurrent.futures.process import BrokenProcessPool

    ing = Ingestor(_open(tmp_path), workers=1)
    try:
        ing.start_workers()
        pool = ing._pool
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)
        pipe = os.fstat(pool._workers[0].results.fileno()).st_ino
        fds = [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        (end,) = [
            f
            for f in fds
            if stat.S_ISFIFO(os.stat(f).st_mode) and os.stat(f).st_ino == pipe
        ]
        writer = os.open(end, os.O_WRONLY)
        os.write(writer, struct.pack("!i", 1000) + b"half")
        os.close(writer)
        pending = pool.submit([b'{"text": "never answered"}'])
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(BrokenProcessPool):
            pool.result(pending)
        assert time.monotonic() - start < 15
        # the stream goes on without the pool: every batch checked here
        batches = _batches(2)
        got = [_summary(a) for a in ing.submit_stream((b, None) for b in batches)]
        fresh = Ingestor(_open(tmp_path, "ref.db"))
        assert got == [_summary(fresh.submit(b)) for b in batches]
    finally:
        ing.close()
