# Type stub of the C extension client/_pii.c.
from collections.abc import Sequence

def scrub_ascii(texts: Sequence[str], /) -> list[tuple[str, dict[str, int]] | None]: ...

BUILTIN: tuple[tuple[str, str], ...]
