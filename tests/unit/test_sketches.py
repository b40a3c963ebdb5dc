"""client._native.sketches: rensa's R-MinHash digests computed natively, byte for byte
the bytes of the pipeline it replaces (token_hashes -> rensa's
digest_matrix_from_flat_token_hashes -> to_rows -> rows_to_bytes), on every kernel
the CPU has; and client.near_py's twin gives the same bytes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rensa import RMinHash

from client import _native, near_py
from client.gate import normalise
from client.ingest import shingles
from common.corpus import DOMAINS, generate

ROOT = Path(__file__).resolve().parents[2]
PARAMS = [(128, 17), (64, 0), (256, 12345), (100, 5), (1, 3), (3, 2**64 - 1)]


# rensa 0.5.0's R-MinHash (algorithm version 2), as client/_native.c documents it:
# here to find inputs for its rare branches, and to pin the formula down.
_M64 = (1 << 64) - 1
_BUCKET, _ROUND, _FALLBACK = 0x6A09E667F3BCC909, 0x3C6EF372FE94F82B, 0xBB67AE8584CAA73B


def _splitmix64(v: int) -> int:
    v = (v + 0x9E3779B97F4A7C15) & _M64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _M64
    return v ^ (v >> 31)


def _permutations(num_perm: int, seed: int) -> list[tuple[int, int]]:
    """Xoshiro256++ from SplitMix64(seed) (rand_xoshiro's seed_from_u64): a | 1, b."""

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (64 - r))) & _M64

    s = [_splitmix64((seed + i * 0x9E3779B97F4A7C15) & _M64) for i in range(4)]
    out = []
    for _ in range(2 * num_perm):
        out.append((rotl((s[0] + s[3]) & _M64, 23) + s[0]) & _M64)
        t = (s[1] << 17) & _M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
    return [(out[2 * i] | 1, out[2 * i + 1]) for i in range(num_perm)]


def _slot(x: int, num_perm: int) -> int:
    """Lemire's multiply-shift on the low word; a rejected low word re-mixes x."""
    while ((x & 0xFFFFFFFF) * num_perm) & 0xFFFFFFFF < (1 << 32) % num_perm:
        x = _splitmix64(x)
    return ((x & 0xFFFFFFFF) * num_perm) >> 32


def _digest(hashes: list[int], num_perm: int, seed: int) -> list[int]:
    perms = _permutations(num_perm, seed)
    row = [0xFFFFFFFF] * num_perm
    for h in hashes:
        f = _splitmix64(h ^ perms[0][0] ^ _FALLBACK)
        for i, (a, b) in enumerate(perms):
            row[i] = min(row[i], 3 << 30 | ((a * f + b) & _M64) >> 34)
        for r in range(3):
            x = _splitmix64(h ^ perms[0][1] ^ _BUCKET ^ (r * _ROUND) & _M64)
            i = _slot(x, num_perm)
            row[i] = min(row[i], r << 30 | x >> 34)
    return row


def pipeline(items: list, num_perm: int, seed: int) -> bytes:
    """What client.ingest.NearDuplicates.sketch_many computed before sketches()."""
    hashes, offsets = _native.token_hashes(items)
    matrix = RMinHash.digest_matrix_from_flat_token_hashes(
        np.frombuffer(hashes, dtype=np.uint64),
        np.frombuffer(offsets, dtype=np.uint64),
        num_perm,
        seed,
    )
    return _native.rows_to_bytes(matrix.to_rows(), num_perm)


def assert_same(got: bytes, want: bytes, num_perm: int) -> None:
    if got != want:  # name the first differing row, not just "bytes differ"
        a = np.frombuffer(got, dtype=np.uint32).reshape(-1, num_perm)
        b = np.frombuffer(want, dtype=np.uint32).reshape(-1, num_perm)
        assert a.shape == b.shape
        row = int(np.nonzero((a != b).any(axis=1))[0][0])
        pytest.fail(f"row {row} differs: {a[row][:8]}... vs {b[row][:8]}...")


def corpus_texts(per_domain: int = 150) -> list[str]:
    return [normalise(t) for d in DOMAINS for t in generate(d, per_domain, seed=11)]


def hostile_texts(n: int = 600, seed: int = 7) -> list[str]:
    """ASCII texts at the edges of the shingler: no words, 1 and 2 words, runs of
    punctuation, digits and whitespace, control characters, long words."""
    rng = random.Random(seed)
    seps = [" ", "  ", "\t", "\n", ". ", ", ", "...", " - ", "\x00", "\x1c", "\x7f", ""]
    chars = (
        "abcXYZ_0123456789" + ".,;:!?'\"()[]{}<>@#$%^&*+=/\\|`~-" + " \t\n\r\x0b\x0c"
    )
    out = ["", " ", "a", "ab cd", "ab cd ef", "...", "_", "a.b", "a  b", "\t\n", "0 1"]
    out += ["x" * 1000, "y" * 17 + " " + "z" * 16, " ".join(["w"] * 3)]
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:  # any ASCII characters at all
            out.append(
                "".join(chr(rng.randrange(128)) for _ in range(rng.randrange(40)))
            )
        elif kind == 1:  # the shingler's alphabet, dense in separators
            out.append("".join(rng.choice(chars) for _ in range(rng.randrange(80))))
        else:  # words (some long) joined by assorted separators
            words = [
                "".join(rng.choice("abcz_09") for _ in range(rng.choice([1, 3, 8, 40])))
                for _ in range(rng.randrange(6 if kind == 2 else 60))
            ]
            out.append("".join(w + rng.choice(seps) for w in words))
    return out


def non_ascii_items() -> list[list[str]]:
    """Non-ASCII texts go as shingle lists (client.ingest's way), and the lists
    token_hashes takes beyond those: empty, one empty token, long tokens."""
    texts = [
        "Café crème brûlée, déjà vu.",
        "Straße über Öl; naïve façade",
        "İstanbul ılık dolmuş",
        "東京 の 天気 は 晴れ です",
        "emoji 🙂 and 🚀 in text 🙂",
        "e\u0301 combining marks e\u0301 again",
        "ünïcödé",
        "€ 5",
        "",
    ]
    items = [shingles(normalise(t)) for t in texts]
    items += [[], [""], ["ä" * 300], ["a", "a", "a"], [str(i) for i in range(200)]]
    return items


def long_items() -> list[str]:
    """Inputs long enough for rensa's other paths: at least 2^16 tokens (its early
    rank filter where AVX-512 is at hand) and 2^20 (its rank filter everywhere)."""
    return [
        " ".join(f"w{i % 5003}" for i in range(70_000)),
        " ".join(f"v{i}" for i in range((1 << 20) + 5)),
    ]


@pytest.mark.parametrize(("num_perm", "seed"), PARAMS)
def test_corpus_texts(num_perm, seed):
    texts = corpus_texts()
    assert all(t.isascii() for t in texts)
    for i in range(0, len(texts), 256):
        batch = texts[i : i + 256]
        assert_same(
            _native.sketches(batch, num_perm, seed),
            pipeline(batch, num_perm, seed),
            num_perm,
        )


@pytest.mark.parametrize(("num_perm", "seed"), PARAMS)
def test_hostile_ascii_texts(num_perm, seed):
    texts = hostile_texts()
    assert_same(
        _native.sketches(texts, num_perm, seed),
        pipeline(texts, num_perm, seed),
        num_perm,
    )


@pytest.mark.parametrize(("num_perm", "seed"), PARAMS)
def test_shingle_lists(num_perm, seed):
    items = non_ascii_items()
    mixed = [*items, *corpus_texts(5), tuple(items[0])]
    for batch in (items, mixed):
        assert_same(
            _native.sketches(batch, num_perm, seed),
            pipeline(batch, num_perm, seed),
            num_perm,
        )


@pytest.mark.parametrize("num_perm", [2, 5, 8, 127, 129, 512])
def test_other_widths(num_perm):
    items = [*corpus_texts(10), *hostile_texts(60, seed=num_perm), *non_ascii_items()]
    seed = 1 + num_perm
    assert_same(
        _native.sketches(items, num_perm, seed),
        pipeline(items, num_perm, seed),
        num_perm,
    )


@pytest.mark.parametrize(("num_perm", "seed"), [(128, 17), (100, 5)])
def test_long_inputs(num_perm, seed):
    items = long_items()
    assert_same(
        _native.sketches(items, num_perm, seed),
        pipeline(items, num_perm, seed),
        num_perm,
    )


@pytest.mark.parametrize(("num_perm", "seed"), [(16, 42), (100, 5), (128, 17)])
def test_the_documented_formula(num_perm, seed):
    rng = random.Random(num_perm)
    for k in (0, 1, 2, 7, 40, 300):
        hashes = [rng.getrandbits(64) for _ in range(k)]
        matrix = RMinHash.digest_matrix_from_flat_token_hashes(
            np.array(hashes, dtype=np.uint64),
            np.array([0, k], dtype=np.uint64),
            num_perm,
            seed,
        )
        assert matrix.to_rows()[0] == _digest(hashes, num_perm, seed)


def test_rejected_bucket_draws():
    """A slot draw whose low word times num_perm leaves a remainder (mod 2^32) below
    2^32 mod num_perm is drawn again (1 in 4,400 at num_perm 1,000,000): tokens
    found that take that branch."""
    num_perm, seed = 1_000_000, 17
    b0 = _permutations(1, seed)[0][1]
    stages = [b0 ^ _BUCKET ^ (r * _ROUND) & _M64 for r in range(3)]

    def drawn_again(tok: str) -> bool:
        h = _native.token_hash(tok.encode())
        return any(
            ((_splitmix64(h ^ st) & 0xFFFFFFFF) * num_perm) & 0xFFFFFFFF
            < (1 << 32) % num_perm
            for st in stages
        )

    rejected = [tok for tok in (f"tok{i}" for i in range(20_000)) if drawn_again(tok)]
    assert len(rejected) >= 2
    items = [[rejected[0]], [rejected[1], "tok0"]]
    assert_same(
        _native.sketches(items, num_perm, seed),
        pipeline(items, num_perm, seed),
        num_perm,
    )


def test_empty_rows_and_batches():
    assert _native.sketches([], 128, 17) == b"" == pipeline([], 128, 17)
    assert _native.sketches([[], ()], 16, 17) == b"\xff" * 128  # no token: u32::MAX
    assert _native.sketches([""], 16, 17) == pipeline([""], 16, 17) != b"\xff" * 64


def test_the_ascii_shingler_is_client_ingests():
    """token_hashes (and so sketches) shingles ASCII text as client.ingest.shingles,
    hashed as rensa hashes tokens: checked against rensa itself, independently of
    the native shingler both share."""
    texts = corpus_texts(50) + hostile_texts(400, seed=3)
    hashes, offsets = _native.token_hashes(texts)
    flat = np.frombuffer(hashes, dtype=np.uint64)
    off = np.frombuffer(offsets, dtype=np.uint64)
    want = RMinHash.hash_token_sets([shingles(t) for t in texts])
    for i, t in enumerate(texts):
        assert flat[off[i] : off[i + 1]].tolist() == want[i], repr(t)


def test_near_py_twin_gives_the_same_bytes():
    items = [*corpus_texts(20), *hostile_texts(100), *non_ascii_items()]
    for num_perm, seed in PARAMS[:3]:
        assert_same(
            near_py.sketches(items, num_perm, seed),
            _native.sketches(items, num_perm, seed),
            num_perm,
        )


def test_bad_arguments():
    with pytest.raises(ValueError):
        _native.sketches(["café"], 128, 17)  # non-ASCII text goes as shingles
    with pytest.raises(ValueError):
        _native.sketches(["a"], 0, 17)
    with pytest.raises(OverflowError):
        _native.sketches(["a"], 128, -1)
    with pytest.raises(TypeError):
        _native.sketches([5], 128, 17)
    with pytest.raises(TypeError):
        _native.sketches([[b"a"]], 128, 17)
    with pytest.raises(TypeError):
        _native.sketches(5, 128, 17)


_CHILD = """
import json, sys
from client import _native
items = json.load(open(sys.argv[1]))
with open(sys.argv[2], "wb") as fh:
    for num_perm, seed in json.load(open(sys.argv[3])):
        fh.write(_native.sketches(items, num_perm, seed))
print(_native.sketch_kernel)
"""


def test_every_kernel(tmp_path):
    """The fallback loop is built for the baseline ISA, AVX2 and AVX-512; each one
    the CPU has (FEDSTREAM_SKETCH_KERNEL caps the choice) gives the same bytes."""
    items = [*corpus_texts(40), *hostile_texts(200), *non_ascii_items()]
    params = [(128, 17), (64, 0), (100, 5)]
    (tmp_path / "items.json").write_text(json.dumps(items))
    (tmp_path / "params.json").write_text(json.dumps(params))
    want = b"".join(pipeline(items, n, s) for n, s in params)
    picked = {}
    for cap in ("baseline", "avx2", "avx512"):
        out = tmp_path / f"{cap}.bin"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDSTREAM_SKETCH_KERNEL": cap}
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(tmp_path / "items.json"),
                str(out),
                str(tmp_path / "params.json"),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=True,
        )
        picked[cap] = done.stdout.strip()
        assert out.read_bytes() == want, picked[cap]
    assert picked["baseline"] == "baseline"
    assert picked["avx2"] in ("baseline", "avx2")
    if "FEDSTREAM_SKETCH_KERNEL" not in os.environ:  # uncapped: the best the CPU has
        assert _native.sketch_kernel == picked["avx512"]
