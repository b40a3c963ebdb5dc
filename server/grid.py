"""A Grid that collects replies as soon as they arrive.

Flower 1.42's deployment grid (``HttpGrid``, the ServerApp's link to the SuperLink)
pushes a round's messages and then asks for replies every 3 s, a constant in
``send_and_receive``: each exchange (train, and the three SecAgg+ stages) waits up to
3 s after its last reply. ``PollingGrid`` wraps it and pulls every ``interval``
seconds instead (one small gRPC call to the SuperLink each time); everything else is
the wrapped grid's. The in-memory grid of the Simulation Engine already polls every
0.1 s, and test grids have no push/pull, so ``fast_polling`` wraps ``HttpGrid`` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

__all__ = ["PollingGrid", "fast_polling"]

log = logging.getLogger(__name__)


class PollingGrid(Grid):
    def __init__(self, inner: Grid, interval: float) -> None:
        if interval <= 0:
            raise ValueError("poll interval must be > 0")
        self.inner = inner
        self.interval = interval
        self.pulls = 0  # pull_messages calls made by send_and_receive
        # called after each send_and_receive has pushed its (one or more) messages
        self.after_push: list[Callable[[], None]] = []

    # -- everything but send_and_receive is the wrapped grid's ------------------------
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)  # type: ignore[no-any-return]

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:  # get_nodes, close, ...
        return getattr(self.inner, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's contract: push, then pull until every reply is in or ``timeout``
        seconds have passed (``None``: wait for all of them)."""
        t0 = time.monotonic()
        pending = set(self.inner.push_messages(messages))
        if pending:  # Flower also "sends" empty lists (no evaluation asked)
            for hook in self.after_push:
                hook()
        asked = len(pending)
        end = None if timeout is None else t0 + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.inner.pull_messages(pending))
            self.pulls += 1
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            time.sleep(self.interval if left is None else min(self.interval, left))
        log.info(
            "%d of %d replies in %.2f s", len(replies), asked, time.monotonic() - t0
        )
        return replies


def fast_polling(grid: Grid, interval: float) -> Grid:
    """``grid`` polling every ``interval`` s when it is Flower's deployment grid."""
    if isinstance(grid, HttpGrid):
        return PollingGrid(grid, interval)
    return grid
