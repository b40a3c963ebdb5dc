"""The polls around a round: the server's PollingGrid, the SuperNode's capped sleeps."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from client import supernode
from server.grid import PollingGrid, fast_polling


class ScriptedGrid(Grid):
    """Replies become available ``delays[node]`` seconds after the push."""

    def __init__(self, delays: dict[int, float]) -> None:
        self.delays = delays
        self.pushed_at = 0.0
        self.ids: dict[str, int] = {}
        self.given: set[str] = set()

    def set_run(self, run):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *a, **k):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.delays)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed_at = time.monotonic()
        out = []
        for i, m in enumerate(messages):
            mid = f"m{i}"
            self.ids[mid] = m.metadata.dst_node_id
            out.append(mid)
        return out

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic() - self.pushed_at
        replies = []
        for mid in message_ids:
            node = self.ids[mid]
            if mid not in self.given and now >= self.delays[node]:
                self.given.add(mid)
                reply = Message(
                    RecordDict({"c": ConfigRecord({"node": node})}),
                    dst_node_id=0,
                    message_type="train",
                )
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                replies.append(reply)
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise AssertionError("PollingGrid must not call the inner send_and_receive")


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [
        Message(
            RecordDict({"c": ConfigRecord({"x": 1})}),
            dst_node_id=n,
            message_type="train",
        )
        for n in nodes
    ]


@pytest.mark.usefixtures("task_identity")
def test_polling_grid_returns_soon_after_the_last_reply() -> None:
    inner = ScriptedGrid({1: 0.05, 2: 0.3, 3: 0.0})
    grid = PollingGrid(inner, 0.02)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(_messages([1, 2, 3]), timeout=10))
    took = time.monotonic() - t0
    assert sorted(r.content.config_records["c"]["node"] for r in replies) == [1, 2, 3]
    assert 0.3 <= took < 2.0  # Flower's own grid sleeps 3 s after its first pull
    assert grid.pulls >= 5


@pytest.mark.usefixtures("task_identity")
def test_polling_grid_gives_up_at_the_timeout_with_what_arrived() -> None:
    inner = ScriptedGrid({1: 0.0, 2: 5.0})
    grid = PollingGrid(inner, 0.05)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(_messages([1, 2]), timeout=0.4))
    took = time.monotonic() - t0
    assert [r.content.config_records["c"]["node"] for r in replies] == [1]
    assert 0.4 <= took < 2.0


def test_polling_grid_forwards_the_rest_and_wraps_only_flowers_deployment_grid() -> (
    None
):
    inner = ScriptedGrid({7: 0.0})
    grid = PollingGrid(inner, 0.1)
    assert list(grid.get_node_ids()) == [7]
    assert grid.delays == {7: 0.0}  # attribute lookups reach the wrapped grid
    assert fast_polling(inner, 0.1) is inner  # not Flower's HttpGrid: left alone
    with pytest.raises(ValueError, match="poll interval"):
        PollingGrid(inner, 0)


def test_supernode_flag_is_taken_out_of_flowers_arguments() -> None:
    cap, warm, rest = supernode.split_args(
        ["--poll-interval", "0.25", "--superlink", "h:1", "--poll-interval=0.5"]
    )
    assert cap == 0.5 and not warm and rest == ["--superlink", "h:1"]
    assert supernode.split_args(["--warm-clientapp", "--insecure"]) == (
        None,
        True,
        ["--insecure"],
    )
    with pytest.raises(SystemExit, match="must be > 0"):
        supernode.split_args(["--poll-interval", "0"])


def test_supernode_patch_caps_the_sleeps_of_flowers_loop() -> None:
    from flwr.supernode import start_client_internal as sci

    # The loop sleeps through the module's ``time``: 3 s idle, 0.5 s for a reply.
    source = inspect.getsource(sci)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    original = sci.time
    try:
        supernode.patch(0.01)
        t0 = time.monotonic()
        sci.time.sleep(3)
        sci.time.sleep(0.5)
        assert time.monotonic() - t0 < 0.5
        assert sci.time.monotonic() > 0  # the rest of the module is time's
        supernode.patch(0.02)  # patching again replaces the cap
        assert sci.time.cap == 0.02
    finally:
        sci.time = original
