from collections.abc import Sequence
from typing import Any

def seal_many(
    key: bytes, contents: Sequence[dict[str, Any]], aads: bytes, nonces: bytes, /
) -> tuple[bytes, bytes] | None: ...
def available() -> bool: ...
