"""client._pii.scrub_ascii against Python re: the same text and counts as
``Scrubber()._scrub(text, Scrubber().regex)`` for every ASCII text, None for the rest,
and no crash on any input."""

from __future__ import annotations

import importlib.util
import json
import random
import threading
from collections import Counter
from pathlib import Path

import pytest

from client import pii
from client._pii import scrub_ascii
from client.pii import Scrubber
from tests.unit.test_gate import (
    _PIECES,
    assert_batches_give_the_full_alternation,
    joined_pieces,
)

ALL_TYPES = {name for name, _ in pii.BUILTIN}  # every placeholder type

ROOT = Path(__file__).resolve().parents[2]
SCRUBBER = Scrubber()


def want(text: str) -> tuple[str, dict[str, int]]:
    got = SCRUBBER._scrub(text, SCRUBBER.regex)
    return got.text, dict(got.counts)


def assert_same(texts: list[str]) -> Counter[str]:
    """scrub_ascii of the batch equals Python's result text by text; returns the
    counts seen, so a test can check that it exercised every type."""
    seen: Counter[str] = Counter()
    got = scrub_ascii(texts)
    assert len(got) == len(texts)
    for text, mine in zip(texts, got, strict=True):
        expected = want(text)
        assert mine == expected, text
        seen.update(expected[1])
    return seen


# ---- 1. differential -------------------------------------------------------------


def test_gate_pieces_generator():
    """tests/unit/test_gate.py's generator over its ASCII pieces, 20,000 texts."""
    texts = joined_pieces(11, 20_000, [p for p in _PIECES if p.isascii()])
    assert set(assert_same(texts)) == ALL_TYPES


def _make_records():
    spec = importlib.util.spec_from_file_location(
        "bench_ingest", ROOT / "bench/ingest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_records


def test_bench_records():
    texts = [json.loads(r)["text"] for r in _make_records()(5_000, seed=3)]
    seen = assert_same(texts)
    assert seen["EMAIL"] and seen["PHONE"] and seen["IP"]


# A hostile alphabet: the characters and fragments every pattern turns on.
_HOSTILE = [
    *"0123456789",
    *" .-+()/:=@_\"';,%",
    *"ABCDEFGHKXYZ",
    *"abcdefghopsuxyz",
    "AKIA",
    "gh",
    "ghp_",
    "xox",
    "xoxb-",
    "sk-",
    "eyJ",
    "password",
    "PassWd",
    "pwd",
    "secret",
    "api_key",
    "API-KEY",
    "access-token",
    "token",
    "-----BEGIN ",
    " PRIVATE KEY-----",
    "RSA",
    "-----END ",
    "\n",
    "\t",
    "\r",
    "\x1c",
    "\x1f",
    "\x0b",
    "\x0c",
    "\x00",
    "\x7f",
    "\x01",
]

# Well-formed values of every pattern, to be mutated and glued together.
_SEEDS = [
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "4111111111111111",
    "5500 0000 0000 0004",
    "GB82 WEST 1234 5698 7654 32",
    "GB82WEST12345698765432",
    "DE89 3704 0044 0532 0130 00",
    "+44 20 7946 0958",
    "(555) 123-4567",
    "555.123.4567",
    "+1 (555) 123-4567",
    "192.168.10.24",
    "10.0.0.255",
    "fe80:0:0:0:0:0:0:1",
    "2001:db8:85a3:0:0:8a2e:370:7334",
    "jane.doe+ward7@hospital.example.org",
    "a@b.cc",
    "x_y%z@mail-1.sub.example.co.uk",
    "password=hunter22",
    "PaSSword: 'abcdef'",
    "API-KEY=xyz12345",
    'access_token = "abcdef"',
    "secret:\tvalue99",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_" + "a1" * 18,
    "xoxb-1234567890-abc",
    "sk-" + "A" * 24,
    "eyJabcdefgh.ijklmnop.qrstuvwx",
    "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----x-----END PRIVATE KEY-----",
]
_MUTATIONS = list("0123456789 .-+():_@\"';=,\n\t\x1c\x0bAZaz")
_NARROW = [
    "0123456789 -.()+",
    "0123456789 -.:",
    "0123456789abcdefABCDEF:",
    "ABCDEFGHWXYZ0123456789 ",
    "abcz.@-_+%0123",
    "0123456789.",
]


def _hostile(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:  # fragments of the hostile alphabet
        return "".join(rng.choice(_HOSTILE) for _ in range(rng.randint(1, 40)))
    if kind < 0.75:  # mutated well-formed values, glued
        parts = []
        for _ in range(rng.randint(1, 4)):
            chars = list(rng.choice(_SEEDS))
            for _ in range(rng.randint(0, 3)):
                at = rng.randrange(len(chars) + 1)
                op = rng.randrange(3)
                if op == 0:
                    chars.insert(at, rng.choice(_MUTATIONS))
                elif at < len(chars):
                    if op == 1:
                        del chars[at]
                    else:
                        chars[at] = rng.choice(_MUTATIONS)
            parts.append("".join(chars))
        return rng.choice(["", " ", ".", "-", ":", "x", "\n", "@"]).join(parts)
    if kind < 0.95:  # digits and separators, hex and colons, ...
        alphabet = rng.choice(_NARROW)
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
    # any ASCII character at all
    return "".join(chr(rng.randrange(128)) for _ in range(rng.randint(1, 30)))


@pytest.mark.parametrize("seed", range(4))
def test_hostile_random_strings(seed):
    """4 x 30,000 generated strings."""
    rng = random.Random(1000 + seed)
    texts = [_hostile(rng) for _ in range(30_000)]
    assert set(assert_same(texts)) == ALL_TYPES


_EDGES = [
    # IPv4
    "1.2.3.4",
    "255.255.255.255",
    "256.1.1.1",
    "1.2.3.256",
    "01.2.3.4",
    "1.02.3.4",
    "1.2.3.4.",
    "1.2.3.4.5",
    ".1.2.3.4",
    "a1.2.3.4",
    "1.2.3.4a",
    "1.2.3",
    "10.0.0.1:8080",
    "199.249.200.250",
    "249.250.251.252 and 25.5.2.0",
    # IPv6
    "fe80:0:0:0:0:0:0:1",
    "fe80:0:0:0:0:0:1",
    "fe80:0:0:0:0:0:0:1:2",
    "fe80:0:0:0:0:0:0:12345",
    ":fe80:0:0:0:0:0:0:1",
    "FE80:ABCD:0:0:0:0:0:1.",
    "fe80:0:0:0:0:0:0:g",
    # CARD
    "411111111111",
    "4111111111111",
    "4222222222222",
    "4111111111111111111",
    "41111111111111111111",
    "4111 1111 1111 1111",
    "4111 1111 1111 1112",
    "4111  1111 1111 1111",
    "4111--1111-1111-1111",
    "4111 1111 1111 1111.",
    ".4111 1111 1111 1111",
    "x4111111111111111",
    "4111111111111111x",
    "79927398713",
    "6011 1111 1111 1117 123",
    # IBAN
    "GB82 WEST 1234 5698 7654 32",
    "GB82 WEST 1234 5698 7654 33",
    "GB82WEST12345698765432",
    "gb82 WEST 1234 5698 7654 32",
    "xGB82 WEST 1234 5698 7654 32",
    "GB82 WEST 1234 5698 7654 32x",
    "DE89 3704 0044 0532 0130 00",
    "DE89370400440532013000",
    "AB12" + "C" * 31,
    "AB12 345678901",
    "AB12 34567890123456789",
    # PHONE
    "+44 20 7946 0000",
    "(555) 123-4567",
    "123-456-7890",
    "1234567890",
    "123456789",
    "+123456789",
    "+1234567890123456",
    "555.123.4567",
    "1-2-3-4-5-6-7-8-9",
    "(1)(2)(3)",
    "(12) 34 56 78 90 12",
    "++44 20 7946 0000",
    "a+44 20 7946 0000",
    "+44 20 7946 0000x",
    "12 34 56 78 90 12 34 56",
    "123 456 789 012 345 678",
    "tel:+442079460000.",
    # EMAIL
    "a@b.cc",
    "a@b.c",
    "a@b.c0m",
    "a@b.co1",
    "a@b.co.c1",
    "a@b.cc.",
    "a@b..cc",
    "a@.b.cc",
    "a@b-.cc",
    "a.b@c.d.e.fg",
    "a@b.cd.e",
    "a@b.cd.e1.f",
    "user@@example.com",
    "@example.com",
    "a@example",
    "x+y%z_w.v-u@sub-1.example.co.uk",
    "jane.doe+ward7@hospital.example.org",
    "first a@b.cc then c@d.ee",
    # SECRET key = value
    'API-KEY="abcd"',
    'API-KEY="abc"',
    "Password : 'xyz1'",
    "password=abc",
    "password=abcd",
    "pwd:abcd",
    "passwd = abcd;",
    "secret\t=\x0b'xyz1'",
    "api_key=1234",
    "apikey=1234",
    "api--key=1234",
    "access-token: abcdefgh",
    "accesstoken:abcd",
    "token=abcd=efgh",
    "token:=abcd",
    "mytoken=abcd",
    "token_x=abcd",
    "tokens=abcd",
    'TOKEN = "abc def"',
    "password=\x1cabcd",
    "password=ab,cd",
    # SECRET tokens
    "AKIAIOSFODNN7EXAMPLE",
    "AKIAIOSFODNN7EXAMPL",
    "AKIAIOSFODNN7EXAMPLEX",
    "xAKIAIOSFODNN7EXAMPLE",
    "ghp_" + "a" * 30,
    "ghp_" + "a" * 29,
    "ghp_" + "a" * 36 + "_",
    "ghx_" + "a" * 36,
    "xoxb-1234567890",
    "xoxb-123456789",
    "xoxz-1234567890",
    "sk-" + "a" * 20,
    "sk-" + "a" * 19,
    "eyJabcdefgh.ijklmnop.qrstuvwx",
    "eyJabcdefg.ijklmnop.qrstuvwx",
    "eyJabcdefgh.ijklmnop.qrstuvw",
    "eyJabc-efgh.ij_lmnop.qrstuvwx.yz",
    # PRIVATE_KEY
    "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY----------END PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----abc",
    "-----BEGIN PRIVATE KEY-----abc-----END PRIVATE KEY----",
    "-----BEGIN EC PRIVATE KEY-----a-----BEGIN PRIVATE KEY-----b"
    "-----END PRIVATE KEY-----c",
    "-----BEGIN PRIVATE KEY-----a-----END PRIVATE KEY-----b-----END PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----a-----END X-----END PRIVATE KEY-----",
    "-----BEGIN A PRIVATE KEY PRIVATE KEY-----a-----END PRIVATE KEY PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----\n" + "x\x00" * 50 + "\n-----END PRIVATE KEY-----",
    "------BEGIN PRIVATE KEY-----a-----END PRIVATE KEY-----",
    "-----BEGIN private KEY-----a-----END PRIVATE KEY-----",
    # whitespace and control characters
    "password=\x1fabcd",
    "pwd\x1c=\x1dabcd",
    "pwd\x0c:\x0babcd",
    "pwd\x1b=abcd",
    "1.2.3.4\x00",
    "\x00+44 20 7946 0000\x00",
    "",
    "x",
    "1",
    "12",
    "123",
]


def test_edge_cases():
    assert_same(_EDGES)
    assert_same([a + b for a in _EDGES[::3] for b in _EDGES[1::4]])


# ---- 2. non-ASCII text and the wiring ----------------------------------------------


def test_non_ascii_text_gets_none():
    texts = [
        "é",
        "a@b.cc é",
        "١٢٣ ٤٥٦ ٧٨٩ ٠١٢",
        "paſſword=abcdef",
        "日本",
        "\x80",
        "a\U0001f600",
    ]
    assert scrub_ascii(texts) == [None] * len(texts)
    assert scrub_ascii(["x", "é", "a@b.cc"]) == [
        ("x", {}),
        None,
        ("[EMAIL]", {"EMAIL": 1}),
    ]
    assert scrub_ascii([]) == []


def test_unchanged_text_is_returned_as_is():
    text = "nothing to see " * 3
    assert scrub_ascii([text])[0][0] is text
    kept = "order 4111111111111112"  # a CARD candidate that fails Luhn stays
    assert scrub_ascii([kept]) == [(kept, {})]


def test_scrub_many_uses_the_native_path_and_agrees():
    assert pii.scrub_ascii is scrub_ascii
    rng = random.Random(5)
    texts = []
    for _ in range(3000):
        text = " ".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.3:
            text = _hostile(rng) + text
        texts.append(text)
    assert any(not t.isascii() for t in texts) and any(t.isascii() for t in texts)
    for got in assert_batches_give_the_full_alternation(texts):
        # a dict of its own when something was replaced, else the shared empty map
        assert type(got.counts) in (dict, Counter) or got.counts is pii.NO_PII
        assert not got.counts or got.counts is not pii.NO_PII


def test_scrub_flagged_gives_what_scrub_many_gives():
    """The gate hands texts its native screen flagged to scrub_flagged, which does
    not screen them again: the same results as scrub_many, for any text (flagged or
    not, ASCII or not), with and without the native module."""
    rng = random.Random(11)
    texts = [
        " ".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 6)))
        + (_hostile(rng) if rng.random() < 0.3 else "")
        for _ in range(2000)
    ] + ["plain words only", "é a@b.cc", ""]
    scrubber = Scrubber()
    want = scrubber.scrub_many(texts)
    assert sum(bool(w.counts) for w in want) > 500  # PII in many
    assert scrubber.scrub_flagged(texts) == want
    assert Scrubber(extra={"ORDER": r"ORD-\d+"}).scrub_flagged(["ORD-12 a@b.cc"]) == [
        ("[ORDER] [EMAIL]", {"ORDER": 1, "EMAIL": 1})
    ]


def test_scrub_many_without_the_module(monkeypatch):
    texts = ["a@b.cc", "é a@b.cc", "plain", "+44 20 7946 0000"]
    native = Scrubber().scrub_many(texts)
    monkeypatch.setattr(pii, "scrub_ascii", None)
    assert Scrubber().scrub_many(texts) == native


# ---- 3. robustness ----------------------------------------------------------------

MB = 1 << 20


def _big_linear() -> dict[str, str]:
    """1 MB texts on which Python re is linear too."""
    rng = random.Random(3)
    return {
        "digits_and_separators": "".join(
            rng.choice("0123456789 -.()+") for _ in range(MB)
        ),
        "begin_repeats": "-----BEGIN " * (MB // 11),
        "headers_then_end": "-----BEGIN PRIVATE KEY-----"
        + "-----END X" * (MB // 10)
        + "-----END PRIVATE KEY-----",
        "email_many_labels": "a@" + "b." * (MB // 2) + "cc",
        "key_value_long": "password=" + "x" * MB,
        "mixed": "".join(
            rng.choice(
                [
                    "4111 1111 1111 1111 ",
                    "a@b.cc ",
                    "+44 20 7946 0958 ",
                    "1.2.3.4 ",
                    "x ",
                ]
            )
            for _ in range(MB // 10)
        ),
        "at_signs": "a@" * (MB // 2),
        "controls": "\x1c\x0b \t\x00" * (MB // 5),
    }


def _big_quadratic(n: int) -> dict[str, str]:
    """Texts on which Python re is quadratic (it rescans a run at each position)."""
    return {
        "digit_run": "7" * n,
        "unterminated_headers": "-----BEGIN PRIVATE KEY-----" * (n // 27),
        "upper_run": "A" * n,
        "akia_repeats": "AKIA" * (n // 4),
        "local_part_run": "a." * (n // 2) + "@x",
        "dotted_digits": "1." * (n // 2),
        "email_empty_label": "a@" + ".b1" * (n // 3),
        "hex_colons": "1:" * (n // 2),
    }


def test_one_megabyte_inputs_match_python():
    for name, text in _big_linear().items():
        assert scrub_ascii([text])[0] == want(text), name


def test_inputs_python_is_slow_on():
    for name, text in _big_quadratic(3000).items():
        assert scrub_ascii([text])[0] == want(text), name
    for name, text in _big_quadratic(MB).items():  # nothing to replace in any of them
        assert scrub_ascii([text])[0] == (text, {}), name


def test_stack_use_is_bounded():
    """The matcher's depth does not grow with the text: 1 MB texts on a 256 KB
    thread stack."""
    texts = [*_big_linear().values(), *_big_quadratic(MB).values()]
    results: list[object] = []
    old = threading.stack_size(256 * 1024)
    try:
        worker = threading.Thread(target=lambda: results.append(scrub_ascii(texts)))
        worker.start()
        worker.join()
    finally:
        threading.stack_size(old)
    assert len(results) == 1 and len(results[0]) == len(texts)


def test_wrong_types_raise_type_error():
    for bad in [("a",), "abc", None, {"a": 1}, iter(["a"])]:
        with pytest.raises(TypeError):
            scrub_ascii(bad)
    for item in [b"abc", 1, None, ["a"]]:
        with pytest.raises(TypeError):
            scrub_ascii(["ok", item])


def test_str_subclass_is_scrubbed():
    class Text(str):
        pass

    assert scrub_ascii([Text("mail a@b.cc")]) == [("mail [EMAIL]", {"EMAIL": 1})]
    ((text, counts),) = scrub_ascii([Text("plain")])
    assert (text, counts) == want(Text("plain")) and type(text) is str


def test_the_matcher_implements_exactly_the_builtin_patterns():
    """The C matcher carries the pattern texts it implements; client.pii uses it only
    while they are client.pii.BUILTIN, so a pattern edited on one side fails here
    and leaves the re path alone at run time."""
    from client import _pii

    assert pii._implements_builtin(_pii.BUILTIN)
    assert pii.scrub_ascii is scrub_ascii  # so the native path is on
    edited = [*pii.BUILTIN[:-1], ("PHONE", pii.BUILTIN[-1][1] + "x")]
    assert not pii._implements_builtin(tuple(map(tuple, edited)))
    assert not pii._implements_builtin(_pii.BUILTIN[:-1])
