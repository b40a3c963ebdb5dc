"""The quality gate: every input is either a clean record or a rejection with a reason.

Checks, in order: size of the raw input, UTF-8, JSON (depth-limited), schema (types,
lengths, text xor prompt/response), control characters (stripped) and unpaired
surrogates (rejected), empty text, then PII scrubbing. Duplicates are decided later,
against the store (``client.ingest``), because they depend on what is stored.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from client.pii import NO_PII, Scrubbed, Scrubber

try:
    from client._native import clean_records, simple_records
    from client._native import normalise as _normalise_ascii
except ImportError:  # not built (a Flower App bundle ships sources): all inputs
    simple_records = None  # type: ignore[assignment]  # take the path below
    clean_records = None  # type: ignore[assignment]
    _normalise_ascii = None  # type: ignore[assignment]

__all__ = ["Clean", "Gate", "GateSettings", "Rejected", "normalise"]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SPACE = re.compile(r"\s+")
_FIELDS = {"text", "prompt", "response", "tags", "label", "ts", "id"}
_TEXT = ("text",)


@dataclass(frozen=True)
class GateSettings:
    max_raw_bytes: int = 262_144  # whole input, before parsing
    max_text_bytes: int = 32_768  # text, or prompt + response
    max_depth: int = 4  # JSON nesting
    max_tags: int = 16
    max_field_chars: int = 256  # tag, label, id
    pii_extra: dict[str, str] = field(default_factory=dict)


class Clean(NamedTuple):  # a tuple: built once per record, cheaper than a dataclass
    content: dict[str, Any]  # text | prompt+response, tags, label, id (scrubbed)
    ts: float  # 0 = time of arrival
    key_text: str  # normalised text used for dedup hashes and shingles
    pii: Mapping[str, int]  # replacements per type (read-only when empty)


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass
class _Checked:
    """An input that passed every check; its text still to be scrubbed."""

    content: dict[str, Any]
    parts: tuple[str, ...]  # ("text",) or ("prompt", "response")
    ts: float

    @property
    def texts(self) -> list[str]:
        return [self.content[k] for k in self.parts]

    def finish(self, scrubbed: Iterator[Scrubbed]) -> Clean:
        if len(self.parts) == 1:  # "text": the usual case, without the loop
            done = next(scrubbed)
            self.content["text"] = done.text
            return Clean(self.content, self.ts, normalise(done.text), done.counts)
        pii: Counter[str] = Counter()
        for name in self.parts:
            done = next(scrubbed)
            if done.counts:
                pii.update(done.counts)
            self.content[name] = done.text
        key_text = normalise("\n".join(self.content[k] for k in self.parts))
        return Clean(content=self.content, ts=self.ts, key_text=key_text, pii=pii)


def normalise(text: str) -> str:
    # str.split() and the regex \s agree on whitespace: " ".join(split()) is
    # _SPACE.sub(" ", text).strip(), without a replacement per space. ASCII text is
    # done natively (the same characters, tested); None means "not ASCII".
    if _normalise_ascii is not None:
        done = _normalise_ascii(text)
        if done is not None:
            return done
    return " ".join(text.split()).lower()


def _depth(obj: Any) -> int:
    depth, frontier = 0, [obj]
    while frontier:
        depth += 1
        nxt: list[Any] = []
        for item in frontier:
            if isinstance(item, dict):
                nxt.extend(item.values())
            elif isinstance(item, list):
                nxt.extend(item)
        frontier = nxt
    return depth - 1


class Gate:
    def __init__(self, settings: GateSettings | None = None) -> None:
        self.settings = settings or GateSettings()
        self.scrubber = Scrubber(self.settings.pii_extra)

    def inspect(self, raw: bytes | dict[str, Any]) -> Clean | Rejected:
        """Never raises: a malformed input comes back as ``Rejected(reason)``."""
        return self.inspect_many([raw])[0]

    def inspect_many(
        self, raws: list[bytes | dict[str, Any]]
    ) -> list[Clean | Rejected]:
        """``inspect`` of each input; PII is screened for the whole batch at once."""
        if clean_records is None or self.scrubber.n_extra:
            return self._inspect_many(raws)
        s = self.settings
        # The usual record shape whose text the PII screen passes is done in one
        # native pass (parse, checks, screen, key text); the rest, including the
        # texts the screen flags, takes the path below.
        try:
            out: list[Any] = clean_records(
                raws,
                s.max_raw_bytes,
                s.max_text_bytes,
                s.max_tags,
                s.max_field_chars,
                Clean,
                NO_PII,
            )
        except Exception:  # e.g. MemoryError: the gate itself never raises
            return self._inspect_many(raws)
        # Screened as holding PII, a plain (content, ts): scrubbed here (as
        # _Checked.finish does), without parsing them again.
        flagged = [i for i, f in enumerate(out) if type(f) is tuple]
        if flagged:
            try:
                done = self.scrubber.scrub_flagged([out[i][0]["text"] for i in flagged])
            except Exception:  # the path below finds the input at fault
                done = []
            for i in flagged[len(done) :]:
                out[i] = None
            for i, scrubbed in zip(flagged, done, strict=False):
                content, ts = out[i]
                content["text"] = scrubbed.text
                out[i] = Clean(content, ts, normalise(scrubbed.text), scrubbed.counts)
        rest = [i for i, c in enumerate(out) if c is None]
        if rest:
            for i, verdict in zip(
                rest, self._inspect_many([raws[i] for i in rest]), strict=True
            ):
                out[i] = verdict
        return out  # every position is set

    def _inspect_many(
        self, raws: list[bytes | dict[str, Any]]
    ) -> list[Clean | Rejected]:
        checked = self._checked_many(raws)
        texts = [text for c in checked if isinstance(c, _Checked) for text in c.texts]
        try:
            scrubbed = iter(self.scrubber.scrub_many(texts))
            return [
                c if isinstance(c, Rejected) else c.finish(scrubbed) for c in checked
            ]
        except Exception:  # find the input at fault: it alone gets the reason
            return [c if isinstance(c, Rejected) else self._finish(c) for c in checked]

    def _checked_many(
        self, raws: list[bytes | dict[str, Any]]
    ) -> list[_Checked | Rejected]:
        if simple_records is None:
            return [self._checked(raw) for raw in raws]
        s = self.settings
        # The usual record shape is parsed and checked natively; whatever it
        # declines (None) takes _checked, which is exact for every input.
        try:
            fast = simple_records(
                raws, s.max_raw_bytes, s.max_text_bytes, s.max_tags, s.max_field_chars
            )
        except Exception:  # e.g. MemoryError: the gate itself never raises
            return [self._checked(raw) for raw in raws]
        return [
            self._checked(raw) if f is None else _Checked(f[0], _TEXT, f[1])
            for raw, f in zip(raws, fast, strict=True)
        ]

    def _finish(self, checked: _Checked) -> Clean | Rejected:
        try:
            return checked.finish(iter(self.scrubber.scrub_many(checked.texts)))
        except Exception as err:
            return Rejected(f"gate_error:{type(err).__name__}")

    def _checked(self, raw: bytes | dict[str, Any]) -> _Checked | Rejected:
        try:
            return self._inspect(raw)
        except RecursionError:
            return Rejected("too_deep")
        except Exception as err:
            return Rejected(f"gate_error:{type(err).__name__}")

    def _inspect(self, raw: bytes | dict[str, Any]) -> _Checked | Rejected:
        s = self.settings
        if isinstance(raw, (bytes, bytearray, memoryview)):
            raw = bytes(raw)
            if len(raw) > s.max_raw_bytes:
                return Rejected("too_large")
            try:
                obj = orjson.loads(raw)
                # orjson reads integers past 64 bits as floats; json keeps them.
                exact = not isinstance(obj, dict) or not isinstance(
                    obj.get("id"), float
                )
            except orjson.JSONDecodeError:  # also bad UTF-8, NaN, 1e400, depth
                exact = False
            if not exact:
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return Rejected("invalid_utf8")
                try:
                    obj = json.loads(decoded)
                except json.JSONDecodeError:
                    return Rejected("invalid_json")
        else:
            obj, exact = raw, False
        if not isinstance(obj, dict):
            return Rejected("not_an_object")
        if _depth(obj) > s.max_depth:
            return Rejected("too_deep")
        if not _FIELDS.issuperset(obj):
            unknown = sorted(set(obj) - _FIELDS)
            return Rejected(f"unknown_field:{unknown[0][:40]}")
        # orjson refuses lone surrogates: what it parsed needs no surrogate check.
        return self._fields(obj, check_surrogates=not exact)

    def _fields(
        self, obj: dict[str, Any], *, check_surrogates: bool
    ) -> _Checked | Rejected:
        s = self.settings
        text, prompt, response = obj.get("text"), obj.get("prompt"), obj.get("response")
        if text is not None and (prompt is not None or response is not None):
            return Rejected("schema:text_and_prompt")
        if text is None and (prompt is None or response is None):
            return Rejected("schema:no_text")
        parts = (
            {"text": text}
            if text is not None
            else {"prompt": prompt, "response": response}
        )
        content: dict[str, Any] = {}
        size = 0
        for name, value in parts.items():
            if not isinstance(value, str):
                return Rejected(f"schema:{name}_not_string")
            if check_surrogates and _SURROGATE.search(value):
                return Rejected("invalid_unicode")
            size += len(value.encode("utf-8"))
            if size > s.max_text_bytes:
                return Rejected("too_large")
            value = unicodedata.normalize("NFC", _CONTROL.sub("", value))
            if not value or value.isspace():
                return Rejected("empty")
            content[name] = value  # scrubbed in finish(), once the batch is checked
        for name in ("label", "id"):
            value = obj.get(name)
            if value is None:
                continue
            if isinstance(value, int) and not isinstance(value, bool) and name == "id":
                value = str(value)
            if not isinstance(value, str):
                return Rejected(f"schema:{name}_not_string")
            if (
                not value
                or len(value) > s.max_field_chars
                or (check_surrogates and _SURROGATE.search(value))
            ):
                return Rejected(f"schema:{name}_invalid")
            content[name] = value
        tags = obj.get("tags")
        if tags is not None:
            if not isinstance(tags, list) or len(tags) > s.max_tags:
                return Rejected("schema:tags_invalid")
            if not all(
                isinstance(t, str)
                and 0 < len(t) <= s.max_field_chars
                and not (check_surrogates and _SURROGATE.search(t))
                for t in tags
            ):
                return Rejected("schema:tags_invalid")
            content["tags"] = list(tags)
        ts = obj.get("ts", 0)
        if (
            isinstance(ts, bool)
            or not isinstance(ts, (int, float))
            or not (math.isfinite(ts) and 0 <= ts < 1e11)
        ):
            return Rejected("schema:ts_invalid")
        return _Checked(content, tuple(parts), float(ts))
