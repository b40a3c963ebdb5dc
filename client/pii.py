"""PII scrubbing: typed placeholders for e-mail, phone, card, IBAN, IP, secrets.

All patterns are compiled into one alternation and applied in a single pass per text
(the hot path of ingestion). Candidates that need a checksum are verified before they
are replaced: payment cards by Luhn, IBANs by ISO 7064 mod 97. Configurable extra
patterns come first, so an operator's rule wins over a built-in one.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

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

_CHECKED = {"CARD", "IBAN", "PHONE"}
_KV = re.compile(r"(?i)^[a-z_-]+[\"']?\s*[:=]\s*[\"']?")


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


@dataclass(frozen=True)
class Scrubbed:
    text: str
    counts: Counter[str]


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
        self.regex = re.compile(
            "|".join(f"(?P<g{i}>{pattern})" for i, (_, pattern) in enumerate(rules))
        )

    def scrub(self, text: str) -> Scrubbed:
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

        return Scrubbed(self.regex.sub(replace, text), counts)

    @staticmethod
    def _valid(name: str, value: str) -> bool:
        digits = "".join(ch for ch in value if ch.isdigit())
        if name == "CARD":
            return 13 <= len(digits) <= 19 and luhn_ok(digits)
        if name == "IBAN":
            return iban_ok(value)
        # PHONE: 9-15 digits (E.164), and not a bare run of digits without a "+"
        # (ticket numbers, amounts): those stay.
        if not 9 <= len(digits) <= 15:
            return False
        return value.startswith("+") or any(ch in value for ch in " .-()")
