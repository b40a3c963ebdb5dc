"""PII scrubbing: typed placeholders for e-mail, phone, card, IBAN, IP, secrets.

All patterns are compiled into one alternation and applied in a single pass per text.
Candidates that need a checksum are verified before they are replaced: payment cards
by Luhn, IBANs by ISO 7064 mod 97. Configurable extra patterns come first, so an
operator's rule wins over a built-in one.

Scanning every position of a text against 13 alternatives is the cost of ingestion, so
each text is first screened with facts every match of a pattern implies (a literal such
as ``@`` or ``AKIA``, three digits in a row, seven colons), all found by C-level scans
that skip ahead. A pattern that cannot match anywhere in the text is left out of the
alternation for that text: the leftmost-first result is unchanged, because such a
pattern never wins at any position. A text in which no pattern can produce a
replacement (the common case) is returned as it is without running the alternation.
"""

from __future__ import annotations

import bisect
import itertools
import re
import threading
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import hyperscan

try:
    from client._native import pii_screen
except ImportError:  # not built (a Flower App bundle ships sources): Hyperscan
    pii_screen = None  # type: ignore[assignment]
try:
    from client import _pii
    from client._pii import scrub_ascii
except ImportError:  # not built: every flagged text takes Scrubber.scrub
    _pii = None  # type: ignore[assignment]
    scrub_ascii = None  # type: ignore[assignment]

__all__ = ["BUILTIN", "Scrubber", "iban_ok", "luhn_ok"]

# Order matters where patterns overlap: secrets before generic numbers, cards and
# IBANs before phones.
BUILTIN: list[tuple[str, str]] = [
    (
        "PRIVATE_KEY",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    ),
    ("SECRET", r"\bAKIA[0-9A-Z]{16}\b"),
    ("SECRET", r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    ("SECRET", r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    ("SECRET", r"\bsk-[A-Za-z0-9_-]{20,}"),
    ("SECRET", r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    # key = value: the key stays, the value is replaced (see _KV below)
    (
        "SECRET",
        r"\b(?i:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|token)"
        r"[\"']?\s*[:=]\s*[\"']?[^\s\"',;]{4,}",
    ),
    ("EMAIL", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    ("IBAN", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"),
    ("CARD", r"(?<![\w.])\d(?:[ -]?\d){12,18}(?![\w])"),
    (
        "IP",
        r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
        r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])",
    ),
    ("IP", r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"),
    ("PHONE", r"(?<![\w+])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\w])"),
]


def _implements_builtin(native: tuple[tuple[str, str], ...]) -> bool:
    """Are ``native`` (the pattern texts the C matcher implements) exactly BUILTIN?"""
    return tuple(map(tuple, BUILTIN)) == native


# A pattern edited here only would no longer be what the C matcher matches: then the
# re path alone runs (and a test fails).
if _pii is not None and not _implements_builtin(_pii.BUILTIN):
    scrub_ascii = None  # type: ignore[assignment]

_CHECKED = {"CARD", "IBAN", "PHONE"}
_KV = re.compile(r"(?i)^[a-z_-]+[\"']?\s*[:=]\s*[\"']?")

# What every match of a built-in pattern contains (index into BUILTIN). Literal facts
# are exact substrings of the pattern, outside any case-insensitive part.
_LITERAL = {0: "-----BEGIN ", 1: "AKIA", 2: "gh", 3: "xox", 4: "sk-", 5: "eyJ", 7: "@"}
_EMAIL = 7
_KEY_VALUE, _IBAN, _CARD, _IPV4, _IPV6, _PHONE = 6, 8, 9, 10, 11, 12
# Stems of the key words of the key = value pattern, for ASCII text only: under
# IGNORECASE Python also matches a few non-ASCII letters (U+017F, U+212A, U+0131).
_KV_STEMS = ("pass", "pwd", "secret", "api", "token")
# Where a match can start, in ASCII text: CARD, IPv4 and PHONE at a digit, "+" or
# "("; EMAIL inside the run of local-part characters just before an "@".
_STARTS_KNOWN = {_EMAIL, _CARD, _IPV4, _PHONE}
_DIGIT_START = re.compile(r"[0-9+(]")
_EMAIL_RUN = re.compile(r"[A-Za-z0-9._%+-]+@")
_IBAN_HINT = re.compile(r"[A-Z]{2}\d{2}")
_ANY_DIGIT = re.compile(r"\d")
_SEPARATOR = re.compile(r"[ .\-()]")
# A replaced PHONE or CARD (checksums and digit counts) holds >= 9 digits, at most
# three of ")", "(", " ", ".", "-" apart; an IPv4 address is always replaced.
_REPLACEABLE_DIGITS = re.compile(r"\d(?:\.\d{1,3}\.\d{1,3}\.\d|(?:[ .()-]{0,3}\d){8})")


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in moved))
    except ValueError:
        return False
    return number % 97 == 1


# The batch screen (one native pass over a whole batch: client._native, else
# Hyperscan): a superset of the facts above for ASCII text, where \\d is [0-9] and
# IGNORECASE is ASCII case.
# A text it does not flag cannot get a replacement; non-ASCII text always goes to the
# exact path.
_SCREEN: list[tuple[bytes, int]] = [
    (rb"-----BEGIN ", 0),
    (rb"AKIA", 0),
    (rb"gh[pousr]_", 0),
    (rb"xox[abprs]-", 0),
    (rb"sk-", 0),
    (rb"eyJ", 0),
    (rb"@", 0),
    (rb"pass|pwd|secret|api|token", hyperscan.HS_FLAG_CASELESS),
    (rb"[A-Z]{2}[0-9]{2}", 0),
    (rb"[0-9](?:\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]|(?:[ .()\-]{0,3}[0-9]){8})", 0),
    (rb"(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]", 0),
]


def _screen_database() -> hyperscan.Database:
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(
        expressions=[p for p, _ in _SCREEN],
        ids=list(range(len(_SCREEN))),
        elements=len(_SCREEN),
        flags=[f for _, f in _SCREEN],
    )
    return db


class Scrubbed(NamedTuple):  # one per text: a tuple is cheaper than a dataclass
    text: str
    counts: Mapping[str, int]  # replacements per type; NO_PII when there were none


NO_PII: Mapping[str, int] = MappingProxyType({})  # shared, read-only


class Scrubber:
    """Replace PII in text with ``[TYPE]`` placeholders, counting each type."""

    def __init__(self, extra: dict[str, str] | None = None) -> None:
        rules = [(name.upper(), pattern) for name, pattern in (extra or {}).items()]
        rules += BUILTIN
        for name, pattern in rules:
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                raise ValueError(f"pii pattern name {name!r} must be A-Z, 0-9 or _")
            try:
                re.compile(f"(?:{pattern})|x")  # as it will sit in the alternation
            except re.error as err:
                raise ValueError(
                    f"pii pattern {name}: invalid regex ({err}); use scoped flags "
                    "like (?i:...) instead of a leading (?i)"
                ) from None
        self.names = [name for name, _ in rules]
        self.rules = rules
        self._compiled: dict[tuple[int, ...], re.Pattern[str]] = {}
        self._database: hyperscan.Database | None = None
        self._lock = threading.Lock()
        self.regex = self._alternation(tuple(range(len(rules))))
        self.n_extra = len(rules) - len(BUILTIN)
        # Extras keep their order and group numbers as a block (backreferences).
        self.extra_regex = (
            self._alternation(tuple(range(self.n_extra))) if self.n_extra else None
        )

    def _alternation(self, keep: tuple[int, ...]) -> re.Pattern[str]:
        regex = self._compiled.get(keep)
        if regex is None:
            regex = re.compile("|".join(f"(?P<g{i}>{self.rules[i][1]})" for i in keep))
            if len(self._compiled) < 4096:  # 2**13 subsets at most; bounded anyway
                self._compiled[keep] = regex
        return regex

    def _possible(self, text: str) -> tuple[int, ...] | None:
        """Indices of the rules that may match in ``text``, or None when no rule can
        replace anything there."""
        e = self.n_extra
        keep: list[int] = []
        if self.extra_regex is not None and self.extra_regex.search(text):
            keep.extend(range(e))
        for i, literal in _LITERAL.items():
            if literal in text:
                keep.append(e + i)
        if ("=" in text or ":" in text) and (
            not text.isascii() or any(s in text.lower() for s in _KV_STEMS)
        ):
            keep.append(e + _KEY_VALUE)
        if text.count(":") >= 7:
            keep.append(e + _IPV6)
        iban = _IBAN_HINT.search(text) is not None
        if iban:
            keep.append(e + _IBAN)
        if not keep and not _REPLACEABLE_DIGITS.search(text):
            return None  # at most unreplaced PHONE/CARD candidates
        if _ANY_DIGIT.search(text):  # CARD, IPv4, PHONE need one; kept, matching or not
            keep += (e + _CARD, e + _IPV4, e + _PHONE)
        return tuple(sorted(keep)) if keep else None

    def scrub_many(self, texts: list[str]) -> list[Scrubbed]:
        """``scrub`` of each text; the texts that cannot hold PII are found with one
        native scan of the batch and come back as they are."""
        flagged = self._screen(texts)
        native: dict[int, Scrubbed] = {}
        if scrub_ascii is not None and self.n_extra == 0 and flagged:
            # Exact: scrub_ascii gives _scrub(text, self.regex) (the one-pass
            # alternation of BUILTIN, which scrub equals: its screens only skip work)
            # for ASCII text, with re's backtracking order and the same checksums;
            # None for other text (Unicode \d, \w, \s, case folding): scrub below.
            order = sorted(flagged)
            results = scrub_ascii([texts[i] for i in order])
            for i, got in zip(order, results, strict=True):
                if got is not None:
                    native[i] = Scrubbed(got[0], got[1] or NO_PII)  # a fresh dict
        return [
            native.get(i) or (self.scrub(t) if i in flagged else Scrubbed(t, NO_PII))
            for i, t in enumerate(texts)
        ]

    def scrub_flagged(self, texts: list[str]) -> list[Scrubbed]:
        """``scrub_many`` of texts the screen has flagged already (the gate's
        native pass): the same results, without screening them again."""
        if scrub_ascii is None or self.n_extra:
            return self.scrub_many(texts)
        return [
            self.scrub(t) if got is None else Scrubbed(got[0], got[1] or NO_PII)
            for t, got in zip(texts, scrub_ascii(texts), strict=True)
        ]

    def _screen(self, texts: list[str]) -> set[int]:
        """Indices of the texts that need the exact path."""
        if pii_screen is None:
            flagged = self._screen_hyperscan(texts)
        else:  # the same patterns, matched natively without encoding the texts
            flagged = set(pii_screen(texts))
        if self.extra_regex is not None:
            flagged.update(i for i, t in enumerate(texts) if self.extra_regex.search(t))
        return flagged

    def _screen_hyperscan(self, texts: list[str]) -> set[int]:
        encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
        # \x00 separates texts (the gate strips it from them anyway); a non-ASCII
        # text needs Unicode \d and case folding: both go to the exact path.
        flagged = {i for i, b in enumerate(encoded) if not b.isascii() or 0 in b}
        if flagged:
            encoded = [b"" if i in flagged else b for i, b in enumerate(encoded)]
        starts = list(itertools.accumulate((len(b) + 1 for b in encoded), initial=0))

        def hit(_id: int, _from: int, to: int, _flags: int, _ctx: object) -> None:
            flagged.add(bisect.bisect_right(starts, to - 1) - 1)

        with self._lock:  # one scratch space per database
            if self._database is None:
                self._database = _screen_database()
            self._database.scan(b"\x00".join(encoded), match_event_handler=hit)
        return flagged

    def scrub(self, text: str) -> Scrubbed:
        keep = self._possible(text)
        if keep is None:
            return Scrubbed(text, NO_PII)
        e = self.n_extra
        starts = None
        known = keep[0] >= e and all(i - e in _STARTS_KNOWN for i in keep)
        if known and text.isascii():
            starts = [m.start() for m in _DIGIT_START.finditer(text)]
            if keep[0] == e + _EMAIL:
                for m in _EMAIL_RUN.finditer(text):
                    starts.extend(range(m.start(), m.end() - 1))
                starts = sorted(set(starts))
        return self._scrub(text, self._alternation(keep), starts=starts)

    def _scrub(
        self, text: str, regex: re.Pattern[str], *, starts: list[int] | None = None
    ) -> Scrubbed:
        """``regex.sub`` with the placeholders. ``starts``: every position where a
        match can start; only those are tried (the same matches: ``match`` at a
        position sees the text before it, as ``sub`` does)."""
        counts: Counter[str] = Counter()

        def replace(match: re.Match[str]) -> str:
            idx = int(match.lastgroup[1:])  # type: ignore[index]
            name = self.names[idx]
            value = match.group(0)
            if name in _CHECKED and not self._valid(name, value):
                # A digit run that fails its checksum may still be a phone number.
                if name == "PHONE" or not self._valid("PHONE", value):
                    return value
                name = "PHONE"
            counts[name] += 1
            key = _KV.match(value) if name == "SECRET" else None
            return f"{key.group(0)}[{name}]" if key else f"[{name}]"

        if starts is None:
            return Scrubbed(regex.sub(replace, text), counts)
        out: list[str] = []
        done = 0
        match = regex.match
        for at in starts:
            if at < done:
                continue
            found = match(text, at)
            if found is not None:
                out += (text[done:at], replace(found))
                done = found.end()  # these patterns never match empty
        out.append(text[done:])
        return Scrubbed("".join(out), counts)

    @staticmethod
    def _valid(name: str, value: str) -> bool:
        digits = "".join(filter(str.isdigit, value))
        if name == "CARD":
            return 13 <= len(digits) <= 19 and luhn_ok(digits)
        if name == "IBAN":
            return iban_ok(value)
        # PHONE: 9-15 digits (E.164), and not a bare run of digits without a "+"
        # (ticket numbers, amounts): those stay.
        if not 9 <= len(digits) <= 15:
            return False
        return value.startswith("+") or _SEPARATOR.search(value) is not None
