"""Drifting federations described in a file: hosts, phases of sources, held-out sets.

A scenario (TOML) lists hosts and, per host, phases: from round ``from_round`` on, the
host's stream delivers ``records_per_round`` records a round from ``source`` (or from a
``mix`` of sources with weights). Named held-out sets are evaluated by the server every
round. Example::

    name = "abrupt"
    rounds = 8
    records_per_round = 64
    [heldout]
    banking = "builtin:banking"
    clinical = "builtin:clinical"
    [[hosts]]
    phases = [{from_round = 1, source = "builtin:banking"},
              {from_round = 4, source = "builtin:clinical"}]
    [[hosts]]
    phases = [{from_round = 1, mix = {"builtin:banking" = 0.5, "noise:random" = 0.5}}]

Sources:

* ``builtin:<domain>``: the built-in generated domains (endless);
* ``noise:random``: random letter strings; ``noise:corrupt:<domain>``: a built-in
  domain with its words' letters shuffled and characters replaced (endless);
* ``chatterbot:<language>[/<topic>]``: conversations from the ``chatterbot-corpus``
  package (real text in 20+ languages and topics);
* ``changelog:<from>-<to>``: Debian package changelog entries from those years
  (``/usr/share/doc/*/changelog.Debian.gz``: real text with a time axis);
* ``python:code`` / ``python:prose``: function bodies / docstrings of the Python
  standard library;
* a path (relative to the scenario file) to a ``.jsonl``/``.txt`` file or a folder.

Finite sources are split once, deterministically: every 10th record (by a hash of its
text) is held out and never streamed; the rest is dealt to the hosts that use the
source, each host getting its own records in a seeded order. A host's finite source
that runs out delivers nothing more (the round says so in the host's counters).
Records carry the source as their tag (replay balances over it) and an id
``<host>:<round>:<i>``, so feeding a round twice (a restart) stores nothing twice.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import itertools
import random
import re
import string
import sysconfig
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from common.config import FrozenModel, read_toml, validated
from common.corpus import DOMAINS, generate, read_files
from common.errors import ConfigError, DataError

__all__ = ["BUILTIN", "Scenario", "heldout_texts", "load_scenario", "round_records"]


class Phase(FrozenModel):
    from_round: int = Field(1, ge=1, description="First round of this phase.")
    source: str | None = Field(None, description="Where the records come from.")
    mix: dict[str, float] | None = Field(
        None, description="Several sources with relative weights."
    )

    @model_validator(mode="after")
    def _one(self) -> Phase:
        if (self.source is None) == (self.mix is None):
            raise ValueError("a phase needs exactly one of 'source' and 'mix'")
        if self.mix is not None and not (
            self.mix and all(w > 0 for w in self.mix.values())
        ):
            raise ValueError("mix weights must be positive")
        return self

    def sources(self) -> dict[str, float]:
        return {self.source: 1.0} if self.source is not None else dict(self.mix or {})


class ScenarioHost(FrozenModel):
    name: str | None = None
    phases: list[Phase] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> ScenarioHost:
        rounds = [p.from_round for p in self.phases]
        if rounds != sorted(rounds) or len(set(rounds)) != len(rounds):
            raise ValueError("phases must have increasing from_round values")
        return self

    def phase_at(self, rnd: int) -> Phase | None:
        active = [p for p in self.phases if p.from_round <= rnd]
        return active[-1] if active else None


class Scenario(FrozenModel):
    name: str = "scenario"
    description: str = ""
    rounds: int = Field(8, ge=1)
    records_per_round: int = Field(64, ge=1)
    heldout_records: int = Field(48, ge=1)
    hosts: list[ScenarioHost] = Field(min_length=1)
    heldout: dict[str, str] = Field(default_factory=dict)
    base: Path | None = Field(None, description="Folder that relative paths start in.")

    def all_sources(self) -> set[str]:
        out = set(self.heldout.values())
        for h in self.hosts:
            for p in h.phases:
                out |= set(p.sources())
        return out

    def users(self, source: str) -> list[int]:
        """The hosts that stream ``source`` at some point (dealing order)."""
        return [
            i
            for i, h in enumerate(self.hosts)
            if any(source in p.sources() for p in h.phases)
        ]

    def host_name(self, i: int) -> str:
        return self.hosts[i].name or f"host-{i}"


def _builtin_two_phase(
    name: str, desc: str, hosts: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "name": name,
        "description": desc,
        "rounds": 8,
        "records_per_round": 96,
        "heldout": {"banking": "builtin:banking", "clinical": "builtin:clinical"},
        "hosts": hosts,
    }


def _half_drift(phases: list[dict[str, Any]], stay: str) -> list[dict[str, Any]]:
    """4 hosts: two stream ``phases``, two stay on ``stay`` all along."""
    return [{"phases": phases}] * 2 + [
        {"phases": [{"from_round": 1, "source": stay}]}
    ] * 2


def _switch(old: str, new: str, at: int) -> list[dict[str, Any]]:
    return [{"from_round": 1, "source": old}, {"from_round": at, "source": new}]


_B, _C = "builtin:banking", "builtin:clinical"
BUILTIN: dict[str, dict[str, Any]] = {
    "abrupt": _builtin_two_phase(
        "abrupt",
        "Half of 4 hosts switch from banking to clinical text at round 4.",
        _half_drift(_switch(_B, _C, 4), _B),
    ),
    "gradual": _builtin_two_phase(
        "gradual",
        "Half of 4 hosts move from banking to clinical text over rounds 3-6.",
        _half_drift(
            [
                {"from_round": 1, "source": _B},
                {"from_round": 3, "mix": {_B: 0.75, _C: 0.25}},
                {"from_round": 4, "mix": {_B: 0.5, _C: 0.5}},
                {"from_round": 5, "mix": {_B: 0.25, _C: 0.75}},
                {"from_round": 6, "source": _C},
            ],
            _B,
        ),
    ),
    "recurring": _builtin_two_phase(
        "recurring",
        "Half of 4 hosts alternate banking / clinical every 2 rounds.",
        _half_drift(
            [
                {"from_round": r, "source": _B if (r - 1) // 2 % 2 == 0 else _C}
                for r in (1, 3, 5, 7)
            ],
            _B,
        ),
    ),
    "noisy": _builtin_two_phase(
        "noisy",
        "3 clean hosts (banking, clinical) and one host streaming random text.",
        [
            {"phases": [{"from_round": 1, "source": _B}]},
            {"phases": [{"from_round": 1, "source": _C}]},
            {"phases": [{"from_round": 1, "mix": {_B: 0.5, _C: 0.5}}]},
            {"phases": [{"from_round": 1, "source": "noise:random"}]},
        ],
    ),
    "noisy-clean": _builtin_two_phase(
        "noisy-clean",
        "The 'noisy' scenario without its noisy host (the robustness reference).",
        [
            {"phases": [{"from_round": 1, "source": _B}]},
            {"phases": [{"from_round": 1, "source": _C}]},
            {"phases": [{"from_round": 1, "mix": {_B: 0.5, _C: 0.5}}]},
        ],
    ),
    "languages": {
        "name": "languages",
        "description": "Real conversations: half of 4 hosts switch from English to "
        "Spanish at round 4 (chatterbot-corpus).",
        "rounds": 8,
        "records_per_round": 32,
        "heldout_records": 40,
        "heldout": {"english": "chatterbot:english", "spanish": "chatterbot:spanish"},
        "hosts": _half_drift(
            _switch("chatterbot:english", "chatterbot:spanish", 4),
            "chatterbot:english",
        ),
    },
    "code-prose": {
        "name": "code-prose",
        "description": "Real text: half of 4 hosts switch from Python docstrings "
        "(prose) to Python code at round 4 (the standard library).",
        "rounds": 8,
        "records_per_round": 48,
        "heldout": {"prose": "python:prose", "code": "python:code"},
        "hosts": _half_drift(_switch("python:prose", "python:code", 4), "python:prose"),
    },
}


def load_scenario(spec: str | Path) -> Scenario:
    """A built-in scenario by name, or a scenario TOML file."""
    if str(spec) in BUILTIN:
        return validated(Scenario, BUILTIN[str(spec)])
    path = Path(spec)
    if not path.exists():
        raise ConfigError(
            f"scenario {spec!r} is neither a file nor a built-in scenario "
            f"({', '.join(sorted(BUILTIN))})"
        )
    data = read_toml(path)
    data.setdefault("base", str(path.resolve().parent))
    scen = validated(Scenario, data)
    for src in sorted(scen.all_sources()):
        _check_source(src, scen)
    return scen


# -- sources --------------------------------------------------------------------------
_WORD = re.compile(r"\w+")


def _noise_random(rng: random.Random) -> str:
    words = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
        for _ in range(rng.randint(8, 20))
    ]
    return " ".join(words)


def _corrupt(text: str, rng: random.Random) -> str:
    def shuffle(m: re.Match[str]) -> str:
        chars = list(m.group(0))
        rng.shuffle(chars)
        return "".join(chars)

    out = list(_WORD.sub(shuffle, text))
    for i in range(len(out)):
        if rng.random() < 0.15:
            out[i] = rng.choice(string.ascii_letters + string.digits)
    return "".join(out)


def _endless(source: str, n: int, seed: str) -> list[str] | None:
    """Records of an endless (generated) source, or None if the source is finite."""
    kind, _, arg = source.partition(":")
    rng = random.Random(seed)
    if kind == "builtin":
        return generate(
            arg, n, seed=int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)
        )
    if kind == "noise" and arg == "random":
        return [_noise_random(rng) for _ in range(n)]
    if kind == "noise" and arg.startswith("corrupt:"):
        domain = arg.split(":", 1)[1]
        base = generate(
            domain, n, seed=int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)
        )
        return [_corrupt(t, rng) for t in base]
    return None


def _check_source(source: str, scen: Scenario) -> None:
    kind, _, arg = source.partition(":")
    if kind == "builtin" and arg not in DOMAINS:
        raise ConfigError(
            f"source {source!r}: unknown built-in domain; choose from {list(DOMAINS)}"
        )
    if kind == "noise" and not (arg == "random" or arg.startswith("corrupt:")):
        raise ConfigError(
            f"source {source!r}: use noise:random or noise:corrupt:<domain>"
        )
    if kind in ("builtin", "noise"):
        return
    if not _finite(source, str(scen.base or "")):
        raise ConfigError(f"source {source!r} has no records")


@functools.lru_cache(maxsize=64)
def _finite(source: str, base: str) -> tuple[str, ...]:
    kind, _, arg = source.partition(":")
    if kind == "chatterbot":
        texts = _chatterbot(arg)
    elif kind == "changelog":
        texts = _changelog(arg)
    elif kind == "python":
        texts = _python(arg)
    else:
        path = Path(base, source) if base else Path(source)
        if not path.exists():
            raise ConfigError(f"source {source!r}: {path} does not exist")
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        texts = read_files([f for f in files if f.suffix in (".jsonl", ".txt")])
    # Deduplicate, keep a stable order.
    return tuple(dict.fromkeys(t.strip() for t in texts if t.strip()))


def _chatterbot(arg: str) -> list[str]:
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "source chatterbot:...: install the corpus with "
            "'pip install chatterbot-corpus'"
        )
    root = Path(spec.submodule_search_locations[0]) / "data"
    lang, _, topic = arg.partition("/")
    folder = root / lang
    files = [folder / f"{topic}.yml"] if topic else sorted(folder.glob("*.yml"))
    if not files or not all(f.exists() for f in files):
        raise DataError(f"chatterbot corpus has no {arg!r} (see {root})")
    texts = []
    for f in files:
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            lines = [str(x) for x in conv if isinstance(x, (str, int, float))]
            for a, b in itertools.pairwise(lines):
                texts.append(f"{a} {b}")
    return texts


_DATE = re.compile(r"^ -- .*?, \d{1,2} \w{3} (\d{4}) ")


def _changelog(arg: str) -> list[str]:
    try:
        lo, hi = (int(x) for x in arg.split("-"))
    except ValueError:
        raise DataError(f"changelog source needs years FROM-TO, got {arg!r}") from None
    texts = []
    for path in sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")):
        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        body: list[str] = []
        for line in lines.splitlines():
            m = _DATE.match(line)
            if m:
                if lo <= int(m.group(1)) <= hi and body:
                    texts.append(" ".join(body)[:400])
                body = []
            elif line.startswith("  ") and line.strip():
                body.append(line.strip().lstrip("*-+ ").strip())
    if not texts:
        raise DataError(f"no Debian changelog entries from {arg} on this machine")
    return texts


def _python(arg: str) -> list[str]:
    if arg not in ("code", "prose"):
        raise DataError(f"python source is python:code or python:prose, got {arg!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.glob("*.py"))[:120]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if arg == "prose":
                if doc:
                    texts += [
                        p.replace("\n", " ") for p in doc.split("\n\n") if len(p) > 40
                    ]
            else:
                body = node.body[1:] if doc else node.body
                if body:
                    code = "\n".join(ast.unparse(b) for b in body[:4])
                    texts.append(code[:400])
    return texts


def _heldout_split(text: str) -> bool:
    return hashlib.sha256(text.encode()).digest()[0] % 10 == 0


def _dealt(scen: Scenario, source: str, host: int, seed: int) -> list[str]:
    texts = [t for t in _finite(source, str(scen.base or "")) if not _heldout_split(t)]
    users = scen.users(source)
    mine = texts[users.index(host) :: len(users)] if host in users else []
    random.Random(f"{seed}:{source}:{host}").shuffle(mine)
    return mine


def _take(
    scen: Scenario, source: str, host: int, start: int, n: int, seed: int
) -> list[str]:
    endless = _endless(source, n, f"{seed}:{source}:{host}:{start}")
    if endless is not None:
        return endless
    return _dealt(scen, source, host, seed)[start : start + n]


def _picks(
    scen: Scenario, host: int, rnd: int, seed: int
) -> tuple[random.Random, list[str]]:
    """The source of each record host ``host`` receives before round ``rnd``, and
    the round's generator (it goes on to shuffle the records)."""
    rng = random.Random(f"{seed}:{host}:{rnd}")
    phase = scen.hosts[host].phase_at(rnd)
    if phase is None:
        return rng, []
    sources = phase.sources()
    names = sorted(sources)
    weights = [sources[s] for s in names]
    return rng, rng.choices(names, weights=weights, k=scen.records_per_round)


def round_records(
    scen: Scenario, host: int, rnd: int, *, seed: int
) -> list[dict[str, Any]]:
    """The records host ``host`` receives before round ``rnd`` (deterministic)."""
    rng, picks = _picks(scen, host, rnd, seed)
    out: list[dict[str, Any]] = []
    for src in sorted(set(picks)):
        # Position in this source's stream for this host: every earlier round's share.
        start = sum(_picks(scen, host, r, seed)[1].count(src) for r in range(1, rnd))
        for text in _take(scen, src, host, start, picks.count(src), seed):
            out.append({"text": text, "tags": [src]})
    rng.shuffle(out)
    name = scen.host_name(host)
    return [r | {"id": f"{name}:{rnd}:{i}"} for i, r in enumerate(out)]


def heldout_texts(scen: Scenario, *, seed: int) -> dict[str, list[str]]:
    """The named held-out sets: fresh draws of endless sources (another seed stream),
    the held-out tenth of finite ones."""
    out = {}
    for name, source in scen.heldout.items():
        n = scen.heldout_records
        endless = _endless(source, n, f"heldout:{seed}:{source}")
        if endless is not None:
            out[name] = endless
        else:
            held = [
                t for t in _finite(source, str(scen.base or "")) if _heldout_split(t)
            ]
            random.Random(f"heldout:{seed}:{source}").shuffle(held)
            out[name] = held[:n]
    return out
