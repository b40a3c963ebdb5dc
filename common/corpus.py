"""Built-in streams and record folders.

The built-in streams are project-generated, deterministic text in four domains that
differ in vocabulary and style (clinical notes, bank support tickets, service logs,
recipes). Every record is a function of (domain, seed, index), so held-out sets never
overlap training streams (they use another seed stream).

A data folder holds one sub-folder per host, each with ``.jsonl`` files (one
``{"text": ...}`` object per line) or ``.txt`` files (one record per line).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from common.errors import DataError

__all__ = [
    "DOMAINS",
    "generate",
    "heldout_sets",
    "host_folders",
    "host_records",
    "host_stream",
    "read_files",
]


def _clinical(r: random.Random) -> str:
    age = r.randint(19, 91)
    sex = r.choice(["male", "female"])
    symptom = r.choice(
        [
            "chest pain",
            "shortness of breath",
            "fever and cough",
            "abdominal pain",
            "dizziness",
            "a persistent headache",
            "swelling of the left ankle",
            "palpitations",
        ]
    )
    dx = r.choice(
        [
            "community-acquired pneumonia",
            "stable angina",
            "viral syndrome",
            "acute gastritis",
            "benign positional vertigo",
            "tension headache",
            "deep vein thrombosis ruled out",
            "paroxysmal atrial fibrillation",
        ]
    )
    plan = r.choice(
        [
            "start amoxicillin 500 mg three times daily",
            "order ECG and troponin",
            "oral fluids and rest",
            "omeprazole 20 mg daily for two weeks",
            "refer to cardiology",
            "follow up in clinic in 7 days",
            "repeat labs tomorrow morning",
        ]
    )
    return (
        f"Patient is a {age}-year-old {sex} presenting with {symptom} for "
        f"{r.randint(1, 14)} days. BP {r.randint(100, 170)}/{r.randint(60, 100)}, "
        f"HR {r.randint(55, 120)}. Assessment: {dx}. Plan: {plan}."
    )


def _banking(r: random.Random) -> str:
    issue = r.choice(
        [
            "a duplicate charge",
            "a declined card payment",
            "an unrecognised transfer",
            "a blocked online login",
            "a missing salary deposit",
            "an overdraft fee",
        ]
    )
    product = r.choice(
        [
            "debit card",
            "credit card",
            "savings account",
            "current account",
            "mortgage account",
        ]
    )
    action = r.choice(
        [
            "refunded the fee",
            "raised a dispute with the merchant",
            "reset the online banking password",
            "ordered a new card",
            "escalated the case to the fraud team",
            "explained the pending transaction",
        ]
    )
    status = r.choice(["resolved", "pending", "escalated", "closed"])
    return (
        f"Customer called about {issue} on their {product}. The agent verified "
        f"identity and {action}. Ticket {r.randint(10000, 99999)} marked {status}."
    )


def _devops(r: random.Random) -> str:
    level = r.choice(["INFO", "WARN", "ERROR"])
    service = r.choice(["auth", "billing", "search", "gateway", "scheduler", "cache"])
    event = r.choice(
        [
            "connection pool exhausted",
            "request timed out",
            "leader election completed",
            "retrying upstream call",
            "disk usage above threshold",
            "config reloaded",
            "health check failed",
        ]
    )
    return (
        f"[{level}] {service}-{r.randint(1, 9)} {event} after "
        f"{r.randint(3, 4000)} ms (retry {r.randint(0, 3)}/3); upstream "
        f"10.0.{r.randint(0, 9)}.{r.randint(2, 250)} returned "
        f"{r.choice([200, 429, 500, 502, 503, 504])}."
    )


def _recipes(r: random.Random) -> str:
    ing = [
        "flour",
        "butter",
        "sugar",
        "garlic",
        "onions",
        "tomatoes",
        "cream",
        "lemon juice",
        "olive oil",
        "rice",
        "chickpeas",
        "fresh basil",
    ]
    a, b = r.sample(ing, 2)
    verb = r.choice(["simmer", "bake", "stir", "roast", "fold", "whisk"])
    state = r.choice(
        [
            "golden brown",
            "thick and glossy",
            "soft",
            "fragrant",
            "bubbling at the edges",
            "set in the middle",
        ]
    )
    return (
        f"Combine {r.randint(1, 4)} cups of {a} with {r.randint(1, 6)} tablespoons "
        f"of {b}, then {verb} for {r.randint(3, 45)} minutes until {state}. "
        f"Season to taste and serve warm."
    )


DOMAINS: dict[str, Callable[[random.Random], str]] = {
    "clinical": _clinical,
    "banking": _banking,
    "devops": _devops,
    "recipes": _recipes,
}

_HELDOUT_SALT = 7_919_000


def generate(domain: str, n: int, *, seed: int) -> list[str]:
    if domain not in DOMAINS:
        raise DataError(
            f"unknown built-in domain {domain!r}; choose from {list(DOMAINS)}"
        )
    rng = random.Random(f"{domain}:{seed}")
    return [DOMAINS[domain](rng) for _ in range(n)]


def host_stream(
    host: int, n: int, *, seed: int, primary_share: float = 0.8
) -> list[dict[str, object]]:
    """Host ``i`` streams mostly domain ``i mod 4`` (non-IID), plus some of the rest.

    Records are ``{"text": ..., "tags": [domain]}``: the tag balances replay.
    """
    names = list(DOMAINS)
    primary = names[host % len(names)]
    rng = random.Random(f"host:{host}:{seed}")
    n_primary = round(n * primary_share)
    pairs = [
        (t, primary) for t in generate(primary, n_primary, seed=seed * 1000 + host)
    ]
    others = [d for d in names if d != primary]
    per_other = (n - n_primary) // max(len(others), 1)
    for d in others:
        pairs += [(t, d) for t in generate(d, per_other, seed=seed * 1000 + host + 500)]
    while len(pairs) < n:
        extra = generate(primary, 1, seed=seed * 1000 + host + 900 + len(pairs))
        pairs.append((extra[0], primary))
    rng.shuffle(pairs)
    return [{"text": t, "tags": [d]} for t, d in pairs]


def host_records(host: int, n: int, *, seed: int) -> list[str]:
    """The texts of ``host_stream``."""
    return [str(r["text"]) for r in host_stream(host, n, seed=seed)]


def heldout_sets(n: int, *, seed: int) -> dict[str, list[str]]:
    return {d: generate(d, n, seed=_HELDOUT_SALT + seed) for d in DOMAINS}


def _parse_jsonl(path: Path) -> list[str]:
    out: list[str] = []
    with path.open(encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({err.msg})"
                ) from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(
                    f'{path}:{lineno}: expected an object with a "text" string'
                )
            if text.strip():
                out.append(text)
    return out


def read_files(files: list[Path]) -> list[str]:
    texts: list[str] = []
    for path in files:
        try:
            if path.suffix == ".jsonl":
                texts += _parse_jsonl(path)
            else:
                texts += [
                    ln
                    for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip()
                ]
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: not UTF-8 ({err.reason} at byte {err.start})"
            ) from None
    return texts


def host_folders(root: Path) -> list[Path]:
    """One sub-folder per host (names starting with '_' or '.' are not hosts)."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    hosts = sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] not in "_.")
    if not hosts:
        raise DataError(f"data folder {root} has no host sub-folders")
    return hosts
