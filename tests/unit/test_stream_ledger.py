"""Per-record privacy accounting over a stream, and the window/replay selection."""

import json

import pytest
from opacus.accountants import RDPAccountant

from client.ingest import Ingestor
from client.store import Store, load_key
from client.window import WindowSettings, host_epsilon, select_round
from common.privacy import StreamPlan

PLAN = StreamPlan(
    noise_multiplier=0.9,
    sample_rate=0.1,
    steps_per_round=3,
    count_noise=10.0,
    record_budget=6.0,
    delta=1e-5,
)
SECRET = b"s" * 32


def _store(tmp_path, name="store.db"):
    return Store(tmp_path / name, load_key(tmp_path / "store.key"))


def _fill(store, n, label, start=0):
    items = [
        (
            json.dumps(
                {
                    "text": f"{label} record {i} " + "word " * (i % 13),
                    "id": f"{label}-{i}",
                    "label": label,
                }
            ).encode(),
            "t",
        )
        for i in range(start, start + n)
    ]
    return Ingestor(store, horizon=0).submit(items)


@pytest.mark.parametrize(("m", "c"), [(0, 1), (1, 1), (2, 7), (9, 30)])
def test_record_epsilon_equals_an_independent_opacus_computation(m, c):
    acc = RDPAccountant()
    for _ in range(PLAN.steps_per_round * m):  # one accountant step per DP-SGD step
        acc.step(noise_multiplier=PLAN.noise_multiplier, sample_rate=PLAN.sample_rate)
    for _ in range(c):
        acc.step(noise_multiplier=PLAN.count_noise, sample_rate=1.0)
    assert PLAN.epsilon(m, c) == pytest.approx(acc.get_epsilon(PLAN.delta), rel=1e-9)


def test_no_record_passes_its_budget_and_the_host_stops_when_all_are_spent(tmp_path):
    store = _store(tmp_path)
    _fill(store, 40, "a")
    settings = WindowSettings(fresh_cap=1000, replay_cap=1000)
    trained = 0
    for rnd in range(1, 200):
        sel = select_round(store, PLAN, settings, round_num=rnd, secret=SECRET)
        assert host_epsilon(store, PLAN) <= PLAN.record_budget
        if not sel.eligible:
            break
        trained += 1
    else:
        pytest.fail("records never retired")
    assert trained >= 2  # the budget paid for real rounds first
    # Nothing left that could afford a round: the host cannot train until new data.
    assert not select_round(
        store, PLAN, settings, round_num=rnd + 1, secret=SECRET
    ).eligible
    _fill(store, 5, "b")  # new records can still train, with their own budget
    assert (
        len(
            select_round(
                store, PLAN, settings, round_num=rnd + 2, secret=SECRET
            ).eligible
        )
        == 5
    )


def test_spent_budget_survives_a_restart(tmp_path):
    store = _store(tmp_path)
    _fill(store, 30, "a")
    for rnd in (1, 2, 3):
        select_round(store, PLAN, WindowSettings(), round_num=rnd, secret=SECRET)
    spent, eps = store.spend(), host_epsilon(store, PLAN)
    store.close()
    again = _store(tmp_path)
    assert again.spend() == spent and host_epsilon(again, PLAN) == eps > 0
    assert again.meta_int("last_round") == 3


def test_a_surge_of_one_kind_does_not_crowd_out_the_rest(tmp_path):
    store = _store(tmp_path)
    _fill(store, 2000, "surge")
    _fill(store, 60, "rare")
    plan = StreamPlan(
        noise_multiplier=5.0,
        sample_rate=0.01,
        steps_per_round=1,
        count_noise=5.0,
        record_budget=50.0,
        delta=1e-5,
    )
    settings = WindowSettings(fresh_cap=100, replay_cap=40)
    select_round(store, plan, settings, round_num=1, secret=SECRET)  # all fresh
    sel = select_round(store, plan, settings, round_num=2, secret=SECRET)
    picked = {r.content["label"] for r in store.iter_records(sel.eligible)}
    counts = {
        lab: sum(r.content["label"] == lab for r in store.iter_records(sel.eligible))
        for lab in picked
    }
    assert 20 <= counts["rare"] <= 60 and 20 <= counts["surge"] <= 60
    assert len(sel.eligible) <= 2 * 40 + 30  # bounded by caps, not by stream size


def test_eligibility_does_not_depend_on_other_groups(tmp_path):
    a, b = _store(tmp_path, "a.db"), _store(tmp_path, "b.db")
    _fill(a, 50, "x")
    _fill(b, 50, "x")
    _fill(b, 500, "other")  # only in b
    settings = WindowSettings(fresh_cap=10, replay_cap=10)
    for rnd in (1, 2):
        sa = select_round(a, PLAN, settings, round_num=rnd, secret=SECRET)
        sb = select_round(b, PLAN, settings, round_num=rnd, secret=SECRET)
    xa = {r.content["id"] for r in a.iter_records(sa.eligible)}
    xb = {
        r.content["id"]
        for r in b.iter_records(sb.eligible)
        if r.content["label"] == "x"
    }
    assert xa == xb and xa


def test_drift_release_is_charged_to_the_drift_sample_as_k_counts(tmp_path):
    """The drift release (noise count_noise / sqrt(k)) costs a sampled record
    exactly k count queries: checked against Opacus with the real sigma."""
    import math

    k = 16
    store = _store(tmp_path)
    _fill(store, 300, "a")
    settings = WindowSettings(fresh_cap=1000, replay_cap=1000)
    sel = select_round(
        store, PLAN, settings, round_num=1, secret=SECRET, drift_weight=k, drift_cap=50
    )
    assert set(sel.drift) <= set(sel.eligible)
    # About drift_cap records, chosen by their own coins (rate from noisy counts).
    assert 20 <= len(sel.drift) <= 90 and sel.drift_expected == pytest.approx(50, 0.3)
    spend = {(m, c): n for m, c, n in store.spend()}
    assert spend == {(1, 1 + k): len(sel.drift), (1, 1): 300 - len(sel.drift)}
    acc = RDPAccountant()
    for _ in range(PLAN.steps_per_round):
        acc.step(noise_multiplier=PLAN.noise_multiplier, sample_rate=PLAN.sample_rate)
    acc.step(noise_multiplier=PLAN.count_noise, sample_rate=1.0)
    acc.step(noise_multiplier=PLAN.count_noise / math.sqrt(k), sample_rate=1.0)
    assert host_epsilon(store, PLAN) == pytest.approx(
        acc.get_epsilon(PLAN.delta), rel=1e-9
    )
    # Next round the same records are replay, not fresh: no drift charge again.
    sel2 = select_round(
        store, PLAN, settings, round_num=2, secret=SECRET, drift_weight=k, drift_cap=50
    )
    assert sel2.drift == []
    store.close()
