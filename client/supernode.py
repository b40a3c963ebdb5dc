"""Flower's ``flower-supernode`` with a configurable idle poll.

Flower 1.42's SuperNode asks the SuperLink for a message and, when there is none,
sleeps 3 s (a constant in ``flwr.supernode.start_client_internal``); once it has handed
a message to the ClientApp it looks for the reply every 0.5 s. Every exchange of a
round (train, and the three SecAgg+ stages) waits for those sleeps. This entry point
runs Flower's own SuperNode unchanged except that the sleeps of that module are capped
at ``--poll-interval`` seconds (``supernode.poll_interval``): one small PullMessages
call to the SuperLink per interval while idle. With ``--warm-clientapp``
(``supernode.warm_clientapp``) the SuperExec it starts is ``client.superexec``, which
has each ClientApp process started before its message arrives.

    python -m client.supernode --poll-interval 0.5 [--warm-clientapp] <flower args>
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import ModuleType
from typing import Any

__all__ = ["CappedTime", "WarmSuperExec", "main", "patch", "patch_superexec"]

FLAG = "--poll-interval"
WARM = "--warm-clientapp"


class CappedTime:
    """The ``time`` module, with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, module: ModuleType, cap: float) -> None:
        self._module = module
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        self._module.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class WarmSuperExec:
    """The ``subprocess`` module, except that the SuperNode's ``flower-superexec``
    is started as ``client.superexec`` (ClientApp processes started ahead of time)."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def Popen(self, args: Any, *rest: Any, **kwargs: Any) -> Any:
        if isinstance(args, list) and args and args[0] == "flower-superexec":
            args = [sys.executable, "-m", "client.superexec", *args[1:]]
        return self._module.Popen(args, *rest, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def patch_superexec() -> None:
    """Start ``client.superexec`` where Flower's SuperNode starts its SuperExec."""
    from flwr.supernode import start_client_internal as sci

    if not isinstance(sci.subprocess, (ModuleType, WarmSuperExec)):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer starts its SuperExec "
            "through the subprocess module; set supernode.warm_clientapp = false"
        )
    sci.subprocess = WarmSuperExec(subprocess)  # type: ignore[assignment]


def patch(cap: float) -> None:
    """Cap the sleeps of Flower's SuperNode loop at ``cap`` seconds."""
    from flwr.supernode import start_client_internal as sci

    current = sci.time
    if not isinstance(current, (ModuleType, CappedTime)):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer sleeps through the time "
            "module; supernode.poll_interval cannot be applied to this Flower version"
        )
    sci.time = CappedTime(time, cap)  # type: ignore[assignment]


def split_args(argv: list[str]) -> tuple[float | None, bool, list[str]]:
    """Our ``--poll-interval X`` and ``--warm-clientapp``, and the rest (Flower's)."""
    rest: list[str] = []
    cap: float | None = None
    warm = False
    it = iter(argv)
    for arg in it:
        if arg == WARM:
            warm = True
        elif arg == FLAG:
            value = next(it, None)
            if value is None:
                raise SystemExit(f"{FLAG} needs a number of seconds")
            cap = float(value)
        elif arg.startswith(FLAG + "="):
            cap = float(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    if cap is not None and not cap > 0:
        raise SystemExit(f"{FLAG} must be > 0, got {cap}")
    return cap, warm, rest


def main(argv: list[str] | None = None) -> None:
    cap, warm, rest = split_args(list(sys.argv[1:] if argv is None else argv))
    if cap is not None:
        patch(cap)
    if warm:
        patch_superexec()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
