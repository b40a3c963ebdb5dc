"""client.front.Front.run: the usual records in one native pass (front_batch), the
rest through the gate's exact path, merged in order; the same columns as the exact
path alone (Front._run) for every input."""

from __future__ import annotations

import json
import random

import pytest

from client.front import Front
from client.gate import Gate
from client.store import Keys

_native = pytest.importorskip("client._native")  # CI builds it (tests import it)


def _inputs(rng: random.Random, n: int) -> list[bytes | dict]:
    words = ["ward", "note", "Pump", "serviced", "the", "A1", "x_y", "on", "shift"]
    out: list[bytes | dict] = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 30)))
        kind = rng.randrange(14)
        rec: dict = {"text": text}
        if kind == 1:
            rec["text"] += f" mail u{i}@example.com"  # PII: exact path
        if kind == 2:
            rec["text"] = 'quote " back \\ slash / tab \t nl \n cr \r end'
        if kind == 3:
            rec["text"] = text + " caf\u00e9"  # non-ASCII: exact path
        if rng.random() < 0.5:
            rec["id"] = f"id-{i % 40}"
        if rng.random() < 0.3:
            rec["label"] = rng.choice(["a", "b", "lbl"])
        if rng.random() < 0.4:
            rec["tags"] = [f"t{k}" for k in range(rng.randrange(0, 4))]
        if rng.random() < 0.2:
            rec["ts"] = rng.choice([0, 1.5, 1700000000.25, 12])
        if kind == 4:
            rec["id"] = 12345  # a number: exact path
        if kind == 5:
            out.append(rec)  # a dict, not bytes
            continue
        raw = json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode()
        if kind == 6:
            raw = b'{"text": "   "}'
        if kind == 7:
            raw = b"not json"
        if kind == 8:
            raw = b'{"text": "a", "extra": 1}'
        if kind == 9:
            raw = b' {"tags": [], "text" : "spaced out"} '
        if kind == 10:
            raw = b'{"text": "t\\u0041 escaped"}'
        out.append(raw)
    return out


def _opened(keys: Keys, fr, j: int) -> dict:
    payload = fr.payload(j)
    blob = keys.aead.decrypt(payload[:12], payload[12:], fr.rid(j))
    return json.loads(blob)


def test_the_native_pass_and_the_exact_path_give_the_same_columns():
    rng = random.Random(3)
    keys = Keys(bytes(range(32)))
    front = Front(Gate(), keys)
    native_share = 0
    for _ in range(12):
        raws = _inputs(rng, rng.randrange(1, 300))
        got, want = front.run(raws), front._run(raws)
        assert got.rejected == want.rejected
        assert got.passed == want.passed
        for col in ("rids", "chashes", "groups", "sketches"):
            assert getattr(got, col) == getattr(want, col), col
        assert list(got.tss) == list(want.tss)
        assert (list(got.pii_at), got.pii_kinds, list(got.pii_counts)) == (
            list(want.pii_at),
            want.pii_kinds,
            list(want.pii_counts),
        )
        assert len(got.starts) == len(want.starts) == len(got.passed) + 1
        for j in range(len(got.passed)):
            # sealed under other nonces: the same content, bound to the same rid
            assert _opened(keys, got, j) == _opened(keys, want, j)
            assert len(got.payload(j)) == len(want.payload(j))
        raws_bytes = [r for r in raws if isinstance(r, bytes)]
        s = front.gate.settings
        done = _native.front_batch(
            raws_bytes,
            s.max_raw_bytes,
            s.max_text_bytes,
            s.max_tags,
            s.max_field_chars,
            keys.mac,
            keys.key,
            bytes(12 * len(raws_bytes)),
            front.num_perm,
            front.seed,
        )
        native_share += len(done[0]) // 4
    assert native_share > 600  # the native pass did most of them


def test_a_batch_all_native_and_all_exact():
    keys = Keys(bytes(32))
    front = Front(Gate(), keys)
    plain = [json.dumps({"text": f"plain note number {i}"}).encode() for i in range(50)]
    pii = [json.dumps({"text": f"call +44 20 7946 {i:04d}"}).encode() for i in range(5)]
    for raws in (plain, pii, plain + pii, pii + plain, []):
        got, want = front.run(raws), front._run(raws)
        assert (got.passed, got.rids, got.sketches) == (
            want.passed,
            want.rids,
            want.sketches,
        )
        assert got.pii_kinds == want.pii_kinds
