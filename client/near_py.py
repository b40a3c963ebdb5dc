"""Pure-Python twin of ``client._native`` for where the extension is not built (a
Flower App bundle ships sources only): the same sketches and decisions, slower."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from rensa import RMinHash

__all__ = [
    "DUP_CONTENT",
    "DUP_ID",
    "DUP_NEAR",
    "KeyFilter",
    "NearIndex",
    "dedup_keys",
    "gather",
    "gather_var",
    "rows_to_bytes",
    "sketches",
    "sort_keys",
    "token_hashes",
]

from client.front import DUP_CONTENT, DUP_ID, DUP_NEAR


def token_hashes(items: Sequence[str | Sequence[str]]) -> tuple[bytes, bytes]:
    from client.ingest import shingles

    sets = [shingles(t) if isinstance(t, str) else list(t) for t in items]
    hashes = RMinHash.hash_token_sets(sets)
    flat = np.array([h for row in hashes for h in row], dtype=np.uint64)
    offsets = np.cumsum([0, *map(len, hashes)], dtype=np.uint64)
    return flat.tobytes(), offsets.tobytes()


def _keys(blob: bytes, width: int = 16) -> list[bytes]:
    if len(blob) % width:
        raise ValueError(f"a blob of whole {width}-byte keys")
    return [blob[i : i + width] for i in range(0, len(blob), width)]


def gather(blob: bytes, width: int, indices: Sequence[int]) -> bytes:
    if width <= 0:
        raise ValueError("gather(): width must be positive")
    items = len(blob) // width
    if any(not 0 <= i < items for i in indices):
        raise IndexError("gather(): index out of range")
    return b"".join(blob[i * width : (i + 1) * width] for i in indices)


def gather_var(
    blob: bytes, starts: Sequence[int], indices: Sequence[int]
) -> tuple[bytes, list[int]]:
    if (
        not starts
        or starts[-1] > len(blob)
        or any(a > b for a, b in itertools.pairwise(starts))
    ):
        raise ValueError("gather_var(): starts do not fit the blob")
    if any(not 0 <= i < len(starts) - 1 for i in indices):
        raise IndexError("gather_var(): index out of range")
    parts = [blob[starts[i] : starts[i + 1]] for i in indices]
    return b"".join(parts), [len(p) for p in parts]


def dedup_keys(rids: bytes, chashes: bytes) -> bytes:
    keys = [b"r" + k for k in _keys(rids)] + [b"c" + k for k in _keys(chashes)]
    return b"".join(sorted(set(keys)))


def sort_keys(parts: Sequence[bytes], width: int) -> bytes:
    if not 0 < width <= 64 or any(len(p) % width for p in parts):
        raise ValueError("sort_keys(): parts are bytes of whole keys, width in 1..64")
    keys = {p[i : i + width] for p in parts for i in range(0, len(p), width)}
    return b"".join(sorted(keys))


def rows_to_bytes(rows: Sequence[Sequence[int]], width: int) -> bytes:
    return np.array(rows, dtype=np.uint32).reshape(len(rows), width).tobytes()


def sketches(items: Sequence[str | Sequence[str]], num_perm: int, seed: int) -> bytes:
    """``(len(items), num_perm)`` uint32 R-MinHash digests, row-major, by rensa."""
    hashes, offsets = token_hashes(items)
    matrix = RMinHash.digest_matrix_from_flat_token_hashes(
        np.frombuffer(hashes, dtype=np.uint64),
        np.frombuffer(offsets, dtype=np.uint64),
        num_perm,
        seed,
    )
    return rows_to_bytes(matrix.to_rows(), num_perm)


class NearIndex:
    def __init__(
        self, *, num_perm: int, bands: int, horizon: int, threshold: float
    ) -> None:
        self.num_perm, self.bands, self.rows = num_perm, bands, num_perm // bands
        self.horizon, self.threshold = horizon, threshold
        self.digests: OrderedDict[int, np.ndarray] = OrderedDict()
        self.table: list[dict[bytes, set[int]]] = [{} for _ in range(bands)]
        self.next_key = 0

    def _row(self, digests: bytes, row: int) -> np.ndarray:
        return np.frombuffer(digests, dtype=np.uint32).reshape(-1, self.num_perm)[row]

    def _bands(self, d: np.ndarray) -> list[bytes]:
        return [
            d[b * self.rows : (b + 1) * self.rows].tobytes() for b in range(self.bands)
        ]

    def candidates(self, digests: bytes, row: int) -> set[int]:
        d = self._row(digests, row)
        out: set[int] = set()
        for table, band in zip(self.table, self._bands(d), strict=True):
            out |= table.get(band, set())
        return out

    def query(self, digests: bytes, row: int) -> bool:
        d = self._row(digests, row)
        return any(
            (self.digests[k] == d).sum() / self.num_perm >= self.threshold
            for k in self.candidates(digests, row)
        )

    def add(self, digests: bytes, row: int) -> int:
        key = self.next_key
        self.next_key += 1
        d = self._row(digests, row).copy()
        self.digests[key] = d
        for table, band in zip(self.table, self._bands(d), strict=True):
            table.setdefault(band, set()).add(key)
        while len(self.digests) > self.horizon:
            self.remove(next(iter(self.digests)))
        return key

    def offer(self, digests: bytes, row: int) -> int:
        return -1 if self.query(digests, row) else self.add(digests, row)

    def decide(
        self,
        digests: bytes,
        rids: bytes,
        chashes: bytes,
        known_rids: set[bytes],
        known_content: set[bytes],
        prev_rids: bytes = b"",
        prev_chashes: bytes = b"",
    ) -> list[int]:
        """A batch's duplicate decisions, in order (rids, chashes: its 16-byte keys,
        one blob each; prev_*: those of the batch whose commit is in flight):
        ``DUP_ID`` (its rid is known, in prev_rids or earlier in the batch),
        ``DUP_CONTENT`` (its content hash is), ``DUP_NEAR`` (``offer`` refused
        it), else the key ``offer`` gave it."""
        if len(rids) % 16 or len(chashes) != len(rids):
            raise ValueError(
                "decide(): rids and chashes: blobs of as many 16-byte keys"
            )
        seen_rids = set(_keys(prev_rids))
        seen_content = set(_keys(prev_chashes))
        out = []
        for j, (rid, chash) in enumerate(zip(_keys(rids), _keys(chashes), strict=True)):
            if rid in known_rids or rid in seen_rids:
                out.append(DUP_ID)
            elif chash in known_content or chash in seen_content:
                out.append(DUP_CONTENT)
            else:
                key = self.offer(digests, j)
                if key >= 0:
                    seen_rids.add(rid)
                    seen_content.add(chash)
                out.append(key)  # -1 is DUP_NEAR
        return out

    def remove(self, key: int) -> None:
        d = self.digests.pop(key, None)
        if d is None:
            return
        for table, band in zip(self.table, self._bands(d), strict=True):
            keys = table[band]
            keys.discard(key)
            if not keys:
                del table[band]

    def __len__(self) -> int:
        return len(self.digests)


class KeyFilter:
    """Bloom filter over 16-byte keyed hashes: probe positions h1 + i * h2 from the
    key's two little-endian 64-bit halves (h2 odd), the top ``log2_bits`` bits."""

    def __init__(self, *, log2_bits: int, k: int) -> None:
        if not (6 <= log2_bits <= 34 and 1 <= k <= 16):
            raise ValueError("log2_bits in 6..34, k in 1..16")
        self.log2, self.k = log2_bits, k
        self.bits = bytearray(1 << (log2_bits - 3))
        self.added = 0

    def _positions(self, key: bytes) -> list[int]:
        if not isinstance(key, bytes) or len(key) < 16:
            raise TypeError("KeyFilter keys are bytes of at least 16")
        h1 = int.from_bytes(key[:8], "little")
        h2 = int.from_bytes(key[8:16], "little") | 1
        shift, mask = 64 - self.log2, (1 << 64) - 1
        return [((h1 + i * h2) & mask) >> shift for i in range(self.k)]

    def add(self, keys: Sequence[bytes] | bytes) -> None:
        keys = _keys(keys) if isinstance(keys, bytes) else keys
        for key in keys:
            for p in self._positions(key):
                self.bits[p >> 3] |= 1 << (p & 7)
        self.added += len(keys)

    def maybe(self, keys: Sequence[bytes] | bytes) -> list[bytes]:
        keys = _keys(keys) if isinstance(keys, bytes) else keys
        return [
            key
            for key in keys
            if all(self.bits[p >> 3] >> (p & 7) & 1 for p in self._positions(key))
        ]

    def __len__(self) -> int:
        return self.added
