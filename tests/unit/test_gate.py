"""The quality gate and PII scrubbing."""

import json

import pytest

from client.gate import Clean, Gate, GateSettings, Rejected, normalise
from client.pii import Scrubbed, Scrubber, iban_ok, luhn_ok

PLANTED = {
    "EMAIL": "jane.doe+ward7@hospital.example.org",
    "PHONE": "+44 20 7946 0958",
    "CARD": "4111 1111 1111 1111",
    "IBAN": "DE89 3704 0044 0532 0130 00",
    "IP": "192.168.10.24",
    "SECRET": "AKIAIOSFODNN7EXAMPLE",
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_planted_pii_is_replaced_by_its_placeholder(kind, where):
    secret = PLANTED[kind]
    text = {
        "start": f"{secret} was seen",
        "middle": f"we saw {secret} today",
        "end": f"the value is {secret}",
    }[where]
    out = Scrubber().scrub(text)
    assert secret not in out.text
    assert f"[{kind}]" in out.text and out.counts[kind] == 1


def test_checksums_keep_ordinary_numbers():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
    text = "Ticket 48213 took 4000 ms; BP 120/80; order 4111111111111112"
    assert Scrubber().scrub(text).text == text


def test_key_value_secrets_keep_the_key_and_extra_patterns_apply():
    s = Scrubber({"mrn": r"MRN-\d{6}"})
    out = s.scrub("password: hunter2x and api_key=abcd1234efgh for MRN-004211")
    assert out.text == "password: [SECRET] and api_key=[SECRET] for [MRN]"
    with pytest.raises(ValueError, match="scoped flags"):
        Scrubber({"bad": "(?i)x"})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe\xfd", "invalid_utf8"),
        (b"{nope", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"text": "x", "colour": "red"}', "unknown_field:colour"),
        (b'{"text": "x", "prompt": "p", "response": "r"}', "schema:text_and_prompt"),
        (b'{"prompt": "only a prompt"}', "schema:no_text"),
        (b'{"text": 42}', "schema:text_not_string"),
        (b'{"text": " \\n\\t "}', "empty"),
        (b'{"text": "\\u0000\\u0001"}', "empty"),
        (b'{"text": "a\\ud800b"}', "invalid_unicode"),
        (b'{"text": "x", "ts": -1}', "schema:ts_invalid"),
        (b'{"text": "x", "ts": "soon"}', "schema:ts_invalid"),
        (b'{"text": "x", "tags": "a"}', "schema:tags_invalid"),
        (b'{"text": "x", "label": ""}', "schema:label_invalid"),
        (b'{"text": {"a": {"b": {"c": {"d": {"e": 1}}}}}}', "too_deep"),
        (b"[" * 150_000 + b"]" * 150_000, "too_large"),
        (b'{"text": "' + b"a" * 40_000 + b'"}', "too_large"),
    ],
)
def test_each_rejection_has_its_reason(raw, reason):
    verdict = Gate().inspect(raw)
    assert isinstance(verdict, Rejected) and verdict.reason == reason


def test_deep_json_within_size_is_rejected_not_crashed():
    raw = b'{"text": "x", "tags": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    verdict = Gate(GateSettings(max_raw_bytes=10**6)).inspect(raw)
    assert isinstance(verdict, Rejected) and verdict.reason == "too_deep"


def test_clean_record_is_repaired_and_scrubbed():
    raw = json.dumps(
        {
            "prompt": "Reset my card\x07 4111 1111 1111 1111?",
            "response": "Done, mail sent to a@b.io",
            "tags": ["cards"],
            "label": "support",
            "ts": 1700000000,
            "id": 7,
        }
    ).encode()
    verdict = Gate().inspect(raw)
    assert isinstance(verdict, Clean)
    assert verdict.content == {
        "prompt": "Reset my card [CARD]?",
        "response": "Done, mail sent to [EMAIL]",
        "tags": ["cards"],
        "label": "support",
        "id": "7",
    }
    assert verdict.ts == 1700000000 and dict(verdict.pii) == {"CARD": 1, "EMAIL": 1}


_PIECES = [
    *PLANTED.values(),
    "4111-1111-1111-1112",
    "GB82 WEST 1234 5698 7654 32",
    "fe80:0:0:0:0:0:0:1",
    "ghp_" + "a" * 36,
    "xoxb-1234567890-abc",
    "sk-" + "A" * 24,
    "eyJabcdefgh.ijklmnop.qrstuvwx",
    "password=hunter22",
    "PaSSword: 'abcdef'",
    "paſſword=abcdef",  # long s: IGNORECASE matches it, the ASCII screen cannot
    "API-KEY=xyz12345",
    "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----",
    "(555) 123-4567",
    "١٢٣ ٤٥٦ ٧٨٩ ٠١٢",  # Arabic-Indic digits are \d too
    "EMP-123456",
    "123",
    "12345678",
    "1.2.3",
    "256.1.1.1",
    "tokenization",
    "日本",
    "é",
    ":::::::",
    "=",
    "\x00",
    "Ticket 78223",
    "3/3",
]


def joined_pieces(seed: int, n: int, pieces: list[str] = _PIECES) -> list[str]:
    """``n`` texts of 1-6 pieces, their spaces sometimes replaced by other glue."""
    import random

    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.4:
            text = text.replace(" ", rng.choice(["", "-", ".", ",", "\n"]))
        texts.append(text)
    return texts


def assert_batches_give_the_full_alternation(texts: list[str]) -> list[Scrubbed]:
    """``scrub_many`` in batches of 250, without and with extra patterns, gives what
    the one-pass alternation over all patterns gives; returns what it gave."""
    out = []
    for scrubber in (Scrubber(), Scrubber({"emp": r"EMP-\d{6}", "ab": r"(a)\1b"})):
        for start in range(0, len(texts), 250):
            chunk = texts[start : start + 250]
            for text, got in zip(chunk, scrubber.scrub_many(chunk), strict=True):
                want = scrubber._scrub(text, scrubber.regex)
                assert (got.text, got.counts) == (want.text, want.counts), text
                out.append(got)
    return out


def test_batch_screen_gives_exactly_the_full_alternation():
    """The screens only skip work: every text comes out as the one-pass alternation
    over all patterns makes it, placeholders and counts alike."""
    assert_batches_give_the_full_alternation(joined_pieces(7, 3000))


def test_json_edge_cases_keep_their_verdicts():
    """The fast parser falls back to json where the two differ."""
    gate = Gate()
    big = gate.inspect(b'{"text": "hello there", "id": 123456789012345678901234567890}')
    assert (
        isinstance(big, Clean) and big.content["id"] == "123456789012345678901234567890"
    )
    assert gate.inspect(b'{"text": "x", "ts": NaN}') == Rejected("schema:ts_invalid")
    assert gate.inspect(b'{"text": "a \\ud800 b"}') == Rejected("invalid_unicode")
    assert gate.inspect(b'{"text": "\xff"}') == Rejected("invalid_utf8")
    assert gate.inspect({"text": "a \ud800 b"}) == Rejected("invalid_unicode")


_FAST_CASES = [
    b'{"text": "plain words", "id": "r1", "tags": ["a"], "label": "x", "ts": 12.5}',
    b'{"tags":[],"text":"t","ts":0}',
    b' {"text" : "line\\nbreak\\ttab\\rcr \\"q\\" \\\\ \\/"} ',
    b'{"text": "x", "ts": 1e5}',
    b'{"text": "x", "ts": 99999999999.9}',
    b'{"text": "x", "ts": 100000000000}',
    b'{"text": "x", "ts": 1e400}',
    b'{"text": "x", "ts": 123456789012345678901234567890}',
    b'{"text": "x", "ts": -0}',
    b'{"text": "x", "ts": 01}',
    b'{"text": "x", "ts": 1.}',
    b'{"text": "x", "ts": null}',
    b'{"text": "x", "ts": true}',
    b'{"text": "x", "id": 7}',
    b'{"text": "x", "id": ""}',
    b'{"text": "x", "label": "' + b"l" * 256 + b'"}',
    b'{"text": "x", "label": "' + b"l" * 257 + b'"}',
    b'{"text": "x", "tags": [' + b",".join([b'"t"'] * 16) + b"]}",
    b'{"text": "x", "tags": [' + b",".join([b'"t"'] * 17) + b"]}",
    b'{"text": "x", "tags": ["ok", ""]}',
    b'{"text": "x", "tags": ["a",]}',
    b'{"text": "x", "tags": "a"}',
    b'{"text": "x", "text": "y"}',
    b'{"text": "x", "prompt": "y"}',
    b'{"text": "x", "extra": 1}',
    b'{"text": "   \\n\\t "}',
    b'{"text": ""}',
    b'{"text": "a\\u0041"}',
    b'{"text": "a\\bb"}',
    b'{"text": "a\x7fb"}',
    b'{"text": "caf\xc3\xa9"}',
    b'{"text": "a"} x',
    b'{"text": "a",}',
    b"{}",
    b"[]",
    b'{"te\\/xt": "a"}',
    b'{"text": "' + b"w " * 16384 + b'"}',
    b'{"text": "' + b"w " * 16385 + b'"}',
]


def _fields(c):
    return c if isinstance(c, Rejected) else (c.content, c.parts, c.ts)


@pytest.mark.parametrize("raw", _FAST_CASES)
def test_native_fast_path_agrees_with_the_gate(raw):
    """Where the native parser takes an input, client.gate's own path gives the same
    content (key order included) and ts; what it declines, the gate handles."""
    gate = Gate()
    exact = gate._checked(raw)
    fast = gate._checked_many([raw])[0]
    assert _fields(fast) == _fields(exact)
    if not isinstance(exact, Rejected):
        assert list(fast.content) == list(exact.content)


def test_native_fast_path_agrees_on_generated_records():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(st.characters(max_codepoint=0x7F), max_size=40)
    obj = st.fixed_dictionaries(
        {"text": text},
        optional={
            "id": st.one_of(text, st.integers()),
            "label": text,
            "tags": st.lists(text, max_size=18),
            "ts": st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=False)),
        },
    )

    @settings(max_examples=1500, deadline=None, database=None)
    @given(obj, st.booleans())
    def check(record, compact):
        gate = Gate(GateSettings(max_field_chars=30, max_tags=12))
        raw = json.dumps(record, separators=(",", ":") if compact else None).encode()
        assert _fields(gate._checked_many([raw])[0]) == _fields(gate._checked(raw))

    check()


def test_native_pii_screen_flags_what_hyperscan_flags():
    """client._native's screen and the Hyperscan screen flag the same texts, on
    texts built from the screen's own patterns, near misses and noise."""
    import random

    rng = random.Random(0)
    alphabet = "0123456789 .()-:abcdefABCDEF@GHKSTXYZghopusrxk_J=é\x00\n"
    pieces = [
        *PLANTED.values(),
        "-----BEGIN ", "AKIA", "ghp_", "gho_", "gh_", "xoxb-", "xoxq-", "sk-", "eyJ",
        "PASS", "pwd", "SeCrEt", "aPi", "TOKEN", "DE89", "1.2.3.4", "1234.5.6.7",
        "12.345.6.7", "1-2-3-4-5-6-7-8-9", "1    2", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7",
        "abcde:1:2:3:4:5:6:7", "1(2)3.4-5 6 7 8 9", "12345678", "123456789",
    ]  # fmt: skip
    texts = [
        "".join(
            rng.choice([rng.choice(alphabet), rng.choice(pieces), " "])
            for _ in range(rng.randint(0, 7))
        )
        for _ in range(20_000)
    ]
    scrubber = Scrubber()
    native = scrubber._screen(texts)
    assert native == scrubber._screen_hyperscan(texts)
    assert 1_000 < len(native) < len(texts) - 1_000


def test_native_normalise_is_pythons_on_ascii_and_declines_the_rest():
    """The dedup key text: whitespace runs (str.split's, \\x1c-\\x1f included) become
    one space, ends trimmed, ASCII letters lowered; non-ASCII text goes to Python."""
    import random

    from client._native import normalise as native

    rng = random.Random(11)
    every = [chr(i) for i in range(128)]
    for _ in range(50_000):
        pool = every if rng.random() < 0.3 else list(" \t\n\r\x0b\x0c\x1c\x1fAbZz.9")
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 24)))
        assert native(text) == " ".join(text.split()).lower(), repr(text)
    assert native("Größe\u00a0X") is None
    assert normalise("  Größe\u00a0X  ") == "größe x"
    with pytest.raises(TypeError):
        native(b"bytes")


def test_one_pass_fast_lane_gives_the_gates_own_verdicts():
    """Gate.inspect_many parses, screens and normalises the usual shape in one native
    pass (client._native.clean_records); every verdict equals the general path's:
    edge cases, planted PII, generated records, the bench's records."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from ingest import make_records

    rng = random.Random(3)
    words = ["ward", "note", "12", "4821", "a@b.io", "+44 20 7946 0958", "x", "  "]
    words += PLANTED.values()
    generated = [
        json.dumps(
            {
                "text": " ".join(rng.choice(words) for _ in range(8)),
                **({"id": f"i{i}"} if i % 2 else {}),
                **({"tags": ["t", "u"][: i % 3]} if i % 4 else {}),
                **({"ts": rng.uniform(0, 1e10)} if i % 5 == 0 else {}),
            }
        ).encode()
        for i in range(3000)
    ]
    raws = [*_FAST_CASES, *generated, *make_records(2000)]
    gate = Gate()
    fast = gate.inspect_many(raws)
    assert fast == gate._inspect_many(raws)
    kinds = {type(v).__name__ for v in fast}
    assert kinds == {"Clean", "Rejected"}
    assert sum(isinstance(v, Clean) and bool(v.pii) for v in fast) > 500
