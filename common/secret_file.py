"""Per-host secret files (the host secret, the store key): created 0600 once, read
after. Light on imports: the simulator and the agent read them before any model."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import DataError

__all__ = ["ensure_secret"]


def ensure_secret(path: Path, value: bytes | None = None) -> bytes:
    """Read the secret at ``path``, creating it (0600) from ``value`` or os.urandom."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(value if value is not None else os.urandom(32))
                fh.flush()
                os.fsync(fh.fileno())
    secret = path.read_bytes()
    if len(secret) < 16:
        raise DataError(f"host secret {path} is too short; delete it to make a new one")
    return secret
