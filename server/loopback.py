"""Flower's ``Grid`` interface over in-process hosts (tests and benchmarks).

Each message goes to fedstream's real ClientApp with that node's own ``Context``, kept
across messages as a SuperNode keeps it, and every reply the server receives is
recorded (``received``: (stage, reply)), so what the server held can be asserted on.
``drop`` makes a node give no reply at one stage, as a host that goes away. ``app``
is the ClientApp to call: the training code itself by default, or the SuperNode's
front (``client.clientapp``), which hands train messages to a host's worker.
No transport: round times measured over it are computation only.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from client.app import app as client_app
from client.secagg import DELTA
from common.secagg import RECORD

__all__ = ["Loopback"]


class Loopback(Grid):
    def __init__(
        self, data_dirs: dict[int, Path], *, app: ClientApp | None = None
    ) -> None:
        self.app = app or client_app
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"data-dir": str(d)},
                state=RecordDict(),
                run_config={},
            )
            for nid, d in data_dirs.items()
        }
        self.received: list[tuple[str, Message]] = []
        self.drop: set[tuple[str, int]] = set()  # (stage, node): no reply
        self.deltas: dict[int, np.ndarray] = {}  # host side (SecAgg), for references

    def _unused(self, *_: Any, **__: Any) -> NoReturn:
        raise NotImplementedError("Loopback only implements send_and_receive")

    set_run = _unused  # type: ignore[assignment]
    create_message = _unused  # type: ignore[assignment]
    push_messages = _unused  # type: ignore[assignment]
    pull_messages = _unused  # type: ignore[assignment]

    @property
    def run(self) -> NoReturn:  # type: ignore[override]
        raise NotImplementedError("Loopback has no run")

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            sa = msg.content.config_records.get(RECORD)
            stage = str(sa["stage"]) if sa is not None else "train"
            if (stage, nid) in self.drop:
                continue
            reply = self.app(msg, self.contexts[nid])
            state = self.contexts[nid].state  # a worker's call replaces it
            if stage == "train" and DELTA in state.array_records:
                self.deltas[nid] = state.array_records[DELTA]["delta"].numpy().copy()
            self.received.append((stage, reply))
            replies.append(reply)
        return replies
