"""Held-out evaluation off the round's critical path (``federation.overlap_eval``).

The real ServerApp loop (``run_server``) over real hosts' encrypted stores, Flower
messages carried in-process by ``server.loopback.Loopback``: evaluating round N in a
thread while round N+1 trains must publish exactly what the serial loop publishes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from safetensors.numpy import load_file

from client.host import ensure_secret
from common.config import RunConfig
from server.app import run_server
from server.loopback import Loopback
from tests.conftest import fill_store

pytestmark = pytest.mark.usefixtures("task_identity")


def _cfg(out: Path, overlap: bool) -> RunConfig:
    return RunConfig.build(
        {
            "out": str(out),
            "model": {"name": "tiny-llama", "max_length": 32},
            "training": {"sample_rate": 0.25, "local_steps": 2},
            "privacy": {"noise_multiplier": 1.0},
            "federation": {"rounds": 3, "overlap_eval": overlap},
            "data": {"heldout_per_domain": 8},
        }
    )


def _hosts(root: Path) -> dict[int, Path]:
    dirs = {}
    for i in range(2):
        dirs[101 + i] = root / f"host-{i}"
        fill_store(dirs[101 + i], i)
        ensure_secret(dirs[101 + i] / "host.secret")  # copied with the store
    return dirs


def _copy(dirs: dict[int, Path], root: Path) -> Loopback:
    """The same hosts (same stores, same host secrets) in a fresh folder."""
    return Loopback(
        {n: Path(shutil.copytree(d, root / d.name)) for n, d in dirs.items()}
    )


def test_overlapped_evaluation_publishes_what_the_serial_loop_publishes(tmp_path):
    seen: dict[bool, list[int]] = {False: [], True: []}
    folders = {}
    hosts = _hosts(tmp_path / "hosts")
    for overlap in (False, True):
        root = tmp_path / ("overlap" if overlap else "serial")
        folders[overlap] = run_server(
            _copy(hosts, root),
            _cfg(root / "run", overlap),
            on_round=lambda line, o=overlap: seen[o].append(line["round"]),
        )
    assert seen[False] == seen[True] == [0, 1, 2, 3]
    serial, overlapped = (folders[o].read_metrics() for o in (False, True))
    assert [m["round"] for m in overlapped] == [0, 1, 2, 3]
    for a, b in zip(serial, overlapped, strict=True):
        assert a["heldout"] == b["heldout"]  # same adapters, same scores
        assert a.get("epsilon") == b.get("epsilon")
    for m in overlapped[1:]:
        assert m["eval_s"] > 0 and m["wall_s"] > 0 and m["time"] > 0
        assert set(m["heldout"]) and all(v["ppl"] > 0 for v in m["heldout"].values())
    for rnd in (1, 2, 3):
        a, b = (
            load_file(str(folders[o].round_dir(rnd) / "adapter_model.safetensors"))
            for o in (False, True)
        )
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        meta = json.loads((folders[True].round_dir(rnd) / "fedstream.json").read_text())
        assert meta["round"] == rnd
    assert (folders[True].global_dir / "latest").resolve().name == "round-3"


def test_an_error_while_publishing_in_the_background_stops_the_server(tmp_path):
    def boom(line):
        if line["round"] == 1:
            raise RuntimeError("disk full while publishing round 1")

    with pytest.raises(RuntimeError, match="disk full while publishing round 1"):
        grid = Loopback(_hosts(tmp_path / "hosts"))
        run_server(grid, _cfg(tmp_path / "run", True), on_round=boom)
    folder_rounds = sorted(
        p.name for p in (tmp_path / "run" / "global").glob("round-*")
    )
    # Round 1 was saved before its callback failed; the server stopped at the next
    # publish, so round 2 trained but was never published.
    assert folder_rounds == ["round-1"]


class PushPull(Loopback):
    """The loopback hosts behind Flower's push/pull interface, so that the server
    loop runs over ``PollingGrid`` as it does against a SuperLink. ``events``
    records pushes and the start of each held-out evaluation, in order."""

    def __init__(self, dirs: dict[int, Path], events: list[str]) -> None:
        super().__init__(dirs)
        self.events = events
        self._replies: dict[str, Message] = {}

    def push_messages(self, messages):  # type: ignore[override]
        messages = list(messages)
        if messages:
            self.events.append("push")
        ids = {
            m.metadata.dst_node_id: f"m{len(self._replies)}-{i}"
            for i, m in enumerate(messages)
        }
        for reply in Loopback.send_and_receive(self, messages):
            mid = ids[reply.metadata.src_node_id]
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self._replies[mid] = reply
        return list(ids.values())

    def pull_messages(self, message_ids):  # type: ignore[override]
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]


def test_with_a_polling_grid_evaluation_starts_after_the_next_push(
    tmp_path, monkeypatch
):
    from server import app as server_app
    from server.evaluation import HeldOut
    from server.grid import PollingGrid

    events: list[str] = []
    evaluate = HeldOut.evaluate

    def recorded(self, model):
        events.append("eval")
        return evaluate(self, model)

    monkeypatch.setattr(HeldOut, "evaluate", recorded)
    hosts = _hosts(tmp_path / "hosts")
    serial = run_server(
        _copy(hosts, tmp_path / "a"), _cfg(tmp_path / "a" / "run", False)
    )
    events.clear()
    dirs = {
        n: Path(shutil.copytree(d, tmp_path / "b" / d.name)) for n, d in hosts.items()
    }
    grid = PollingGrid(PushPull(dirs, events), 0.01)
    overlapped = server_app.run_server(grid, _cfg(tmp_path / "b" / "run", True))
    # round 0's evaluation, then per round: the train push, then the evaluation
    # of the round before it (rounds 1 and 2), and the last one at the end
    assert events == ["eval", "push", "push", "eval", "push", "eval", "eval"], " ".join(
        events
    )
    assert [m["heldout"] for m in serial.read_metrics()] == [
        m["heldout"] for m in overlapped.read_metrics()
    ]
