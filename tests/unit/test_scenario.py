"""Scenario files: parsing, sources, deterministic round streams, feeding stores."""

from __future__ import annotations

import json

import pytest

from common.config import RunConfig
from common.errors import ConfigError
from common.scenario import BUILTIN, heldout_texts, load_scenario, round_records


def test_every_builtin_scenario_loads_and_streams(tmp_path):
    for name in BUILTIN:
        scen = load_scenario(name)
        assert scen.rounds >= 2 and scen.heldout
        for h in range(len(scen.hosts)):
            recs = round_records(scen, h, 1, seed=0)
            assert len(recs) == scen.records_per_round
            assert all(r["text"].strip() and r["tags"] for r in recs)
        held = heldout_texts(scen, seed=0)
        assert set(held) == set(scen.heldout)
        assert all(len(v) == scen.heldout_records for v in held.values())


def test_phases_switch_sources_and_streams_are_deterministic():
    scen = load_scenario("abrupt")
    before = round_records(scen, 0, 3, seed=5)
    after = round_records(scen, 0, 4, seed=5)
    assert {r["tags"][0] for r in before} == {"builtin:banking"}
    assert {r["tags"][0] for r in after} == {"builtin:clinical"}
    assert round_records(scen, 0, 4, seed=5) == after  # same seed, same stream
    assert round_records(scen, 0, 4, seed=6) != after
    assert after[0]["id"] == "host-0:4:0"
    # Unshifted host keeps its source.
    assert {r["tags"][0] for r in round_records(scen, 3, 6, seed=5)} == {
        "builtin:banking"
    }
    # A gradual phase mixes both.
    mixed = round_records(load_scenario("gradual"), 0, 4, seed=0)
    assert {r["tags"][0] for r in mixed} == {"builtin:banking", "builtin:clinical"}


def test_file_sources_are_dealt_without_overlap_and_never_stream_held_out(tmp_path):
    lines = [f"record number {i} about topic {i % 7}" for i in range(400)]
    (tmp_path / "data.txt").write_text("\n".join(lines))
    (tmp_path / "s.toml").write_text(
        """
rounds = 3
records_per_round = 20
heldout_records = 30
[heldout]
mine = "data.txt"
[[hosts]]
phases = [{from_round = 1, source = "data.txt"}]
[[hosts]]
phases = [{from_round = 2, source = "data.txt"}]
"""
    )
    scen = load_scenario(tmp_path / "s.toml")
    a = [r["text"] for rnd in (1, 2, 3) for r in round_records(scen, 0, rnd, seed=1)]
    b = [r["text"] for rnd in (1, 2, 3) for r in round_records(scen, 1, rnd, seed=1)]
    assert len(a) == 60 and len(b) == 40 and len(set(a)) == 60
    assert not set(a) & set(b)
    held = set(heldout_texts(scen, seed=1)["mine"])
    assert held and not held & (set(a) | set(b))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rounds = 0\n[[hosts]]\nphases = [{source='builtin:banking'}]", "rounds"),
        ("[[hosts]]\nphases = [{from_round = 1}]", "exactly one of"),
        (
            "[[hosts]]\nphases = [{from_round = 3, source='builtin:banking'},"
            "{from_round = 2, source='builtin:clinical'}]",
            "increasing",
        ),
        ("[[hosts]]\nphases = [{source='builtin:poetry'}]", "unknown built-in"),
        ("[[hosts]]\nphases = [{source='missing.jsonl'}]", "does not exist"),
        ("hosts = []", "hosts"),
    ],
)
def test_bad_scenarios_are_one_line_errors_naming_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_scenario(path)
    assert "\n" not in str(err.value)


def test_unknown_scenario_name_lists_the_builtin_ones():
    with pytest.raises(ConfigError, match="abrupt"):
        load_scenario("no-such-scenario")


def test_feeding_a_round_twice_stores_nothing_twice(tmp_path):
    from server.sim import prepare_hosts, scenario_feeder

    cfg = RunConfig.build(
        {"out": str(tmp_path / "run"), "data": {"scenario": "abrupt"}}
    )
    cfg, hosts_dir, _ = prepare_hosts(cfg)
    assert cfg.federation.hosts == 4
    feed = scenario_feeder(cfg, hosts_dir)
    assert feed is not None
    feed(1)
    from client.store import Store, load_key

    def counters(i):
        d = hosts_dir / f"host-{i}"
        store = Store(d / "store.db", load_key(d / "store.key"))
        try:
            return store.counters(), store.offset("scenario")
        finally:
            store.close()

    first = [counters(i) for i in range(4)]
    assert all(c["received"] == 96 and off == "1" for c, off in first)
    feed(1)  # a restarted server feeds round 1 again: nothing new
    assert [counters(i) for i in range(4)] == first
    feed(2)
    c, off = counters(0)
    assert c["received"] == 192 and off == "2"
    assert json.dumps(c)  # counters stay JSON-able for status
