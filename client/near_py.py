"""Pure-Python twin of ``client._native`` for where the extension is not built (a
Flower App bundle ships sources only): the same sketches and decisions, slower."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from rensa import RMinHash

__all__ = ["NearIndex", "rows_to_bytes", "token_hashes"]


def token_hashes(items: Sequence[str | Sequence[str]]) -> tuple[bytes, bytes]:
    from client.ingest import shingles

    sets = [shingles(t) if isinstance(t, str) else list(t) for t in items]
    hashes = RMinHash.hash_token_sets(sets)
    flat = np.array([h for row in hashes for h in row], dtype=np.uint64)
    offsets = np.cumsum([0, *map(len, hashes)], dtype=np.uint64)
    return flat.tobytes(), offsets.tobytes()


def rows_to_bytes(rows: Sequence[Sequence[int]], width: int) -> bytes:
    return np.array(rows, dtype=np.uint32).reshape(len(rows), width).tobytes()


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
