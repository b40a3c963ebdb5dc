"""The ClientApp train handler, called with real Flower messages on a tiny model,
reading a real encrypted store."""

import json
import shutil
import stat

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.host
from client.app import train
from client.host import adapter_model
from client.ingest import Ingestor
from client.store import Store, load_key
from client.window import host_epsilon
from common.adapter import decode_delta, layout_id, to_record, trainable_state
from common.config import RunConfig
from common.corpus import host_records
from common.privacy import run_plan


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


def _fill(data_dir, n=40):
    store = Store(data_dir / "store.db", load_key(data_dir / "store.key"))
    Ingestor(store).submit(
        [(json.dumps({"text": t}).encode(), "t") for t in host_records(0, n, seed=0)]
    )
    count = store.count()
    store.close()
    return count


@pytest.fixture
def setup(tmp_path):
    cfg = RunConfig.build(
        {
            "model": {"name": "tiny-llama", "max_length": 32},
            "training": {"sample_rate": 0.2, "local_steps": 2, "learning_rate": 1e-2},
            "privacy": {"target_epsilon": 3.0},
            "federation": {"rounds": 2},
        }
    )
    data_dir = tmp_path / "host-a"
    data_dir.mkdir()
    return cfg, data_dir, _fill(data_dir)


def _message(cfg, data_dir, rnd, arrays=None):
    if arrays is None:
        _, model = adapter_model(cfg)
        arrays = trainable_state(model)
    config = ConfigRecord(
        {**{f"run.{k}": v for k, v in cfg.to_flat().items()}, "server-round": rnd}
    )
    msg = Message(
        content=RecordDict({"arrays": to_record(arrays), "config": config}),
        dst_node_id=7,
        message_type="train",
    )
    ctx = Context(
        run_id=1,
        node_id=7,
        node_config={"data-dir": str(data_dir)},
        state=RecordDict(),
        run_config={},
    )
    return msg, ctx, arrays


def _spend(cfg, data_dir):
    store = Store(data_dir / "store.db", load_key(data_dir / "store.key"))
    try:
        plan = run_plan(cfg)
        return store.spend(), host_epsilon(store, plan), plan
    finally:
        store.close()


def test_round_reply_and_committed_spend(setup):
    cfg, data_dir, n = setup
    msg, ctx, arrays = _message(cfg, data_dir, 1)
    reply = train(msg, ctx)
    assert not reply.has_error(), reply.error
    shapes = {k: v.shape for k, v in arrays.items()}
    delta = decode_delta(reply.content.array_records["arrays"], shapes)
    assert reply.content.array_records["arrays"]["delta"].dtype == "float16"
    assert any(np.abs(v).max() > 0 for v in delta.values())
    info = reply.content.config_records["info"]
    assert info["host"] == "host-a" and info["layout"] == layout_id(shapes)
    metrics = reply.content.metric_records["metrics"]
    # The example count comes from the noisy counts (sigma 10), not from n itself.
    assert isinstance(metrics["num-examples"], int)
    assert metrics["num-examples"] > 0 and abs(metrics["num-examples"] - n) < 50
    assert metrics["drift-score"] == 0.0 and metrics["drift-event"] == 0
    spend, eps, plan = _spend(cfg, data_dir)
    # Every record: eligible once, counted once, and (all fresh, fewer than the
    # drift sample cap) charged the drift release as query_weight more counts.
    k = cfg.drift.query_weight
    assert spend == [(1, 1 + k, n)]
    assert metrics["epsilon"] == pytest.approx(eps)
    assert eps == pytest.approx(plan.epsilon(1, 1 + k))
    store = Store(data_dir / "store.db", load_key(data_dir / "store.key"))
    try:
        state = store.meta_json("drift_state")
    finally:
        store.close()
    assert state["rounds"] == 1 and state["baseline"] is not None


def test_host_over_budget_refuses_and_says_so_even_after_restart(setup):
    cfg, data_dir, n = setup
    for rnd in (1, 2):  # the planned rounds spend each record's budget
        msg, ctx, _ = _message(cfg, data_dir, rnd)
        assert not train(msg, ctx).has_error()
    spend, eps, _ = _spend(cfg, data_dir)
    assert spend == [(2, 2 + cfg.drift.query_weight, n)] and 2.95 <= eps <= 3.0
    client.host._MODELS.clear()  # a restarted host process
    msg, ctx, _ = _message(cfg, data_dir, 3)
    reply = train(msg, ctx)
    assert reply.has_error() and "privacy budget spent" in reply.error.reason
    assert _spend(cfg, data_dir)[:2] == (spend, eps)  # the refusal spent nothing
    _fill(data_dir, 80)  # new records arrive: the host trains again, on them only
    msg, ctx, _ = _message(cfg, data_dir, 4)
    assert not train(msg, ctx).has_error()
    assert _spend(cfg, data_dir)[1] <= 3.0


def test_missing_store_comes_back_as_an_error_reply(tmp_path, setup):
    cfg, _, _ = setup
    msg, ctx, _ = _message(cfg, tmp_path / "nowhere", 1)
    reply = train(msg, ctx)
    assert reply.has_error() and "has no store" in reply.error.reason


def test_noise_and_sampling_come_from_the_host_secret_not_the_config(tmp_path, setup):
    """The server knows the whole run config (seed included); it must not be able to
    regenerate a host's noise. Same config + same records + other secret = other
    update; same secret = same update (a re-run round repeats its noise)."""
    cfg, a, _ = setup
    b, c = tmp_path / "host-b", tmp_path / "host-c"
    for d in (b, c):
        d.mkdir()
        shutil.copy(a / "store.key", d / "store.key")
        _fill(d)
    client.host.ensure_secret(a / "host.secret")
    shutil.copy(a / "host.secret", c / "host.secret")  # c shares a's secret, b does not
    _, _, start = _message(cfg, a, 1)  # one global adapter for all three
    deltas = {}
    for d in (a, b, c):
        msg, ctx, _ = _message(cfg, d, 1, arrays=start)
        reply = train(msg, ctx)
        assert not reply.has_error(), reply.error
        deltas[d.name] = reply.content.array_records["arrays"]["delta"].numpy()
    assert np.array_equal(deltas["host-a"], deltas["host-c"])
    assert not np.array_equal(deltas["host-a"], deltas["host-b"])
    assert stat.S_IMODE((b / "host.secret").stat().st_mode) == 0o600
    assert len((b / "host.secret").read_bytes()) == 32


def test_agent_status_reports_the_spend_of_a_trained_host(setup):
    from client.agent import status
    from common.agent_config import AgentConfig

    cfg, data_dir, n = setup
    msg, ctx, _ = _message(cfg, data_dir, 1)
    assert not train(msg, ctx).has_error()
    info = status(AgentConfig(data_dir=str(data_dir)))
    _, eps, _ = _spend(cfg, data_dir)
    assert info["stored"] == n and info["last_round"] == 1
    assert info["window"] == n and info["replay"] == 0  # round 1: every record fresh
    assert info["epsilon_spent"] == pytest.approx(eps) and eps > 0
    assert info["epsilon_budget"] == 3.0
    assert info["epsilon_left"] == pytest.approx(3.0 - eps)
    assert info["can_train"] is True


def test_a_second_run_starting_at_round_one_gets_fresh_noise(setup):
    """Noise is keyed by the host's release counter, not by the server's round: a
    new run (or a re-run after a crash) asking for round 1 again must not reuse the
    first answer's noise on other inputs; it is a new release, charged again."""
    cfg, data_dir, n = setup
    deltas = []
    for _ in range(2):
        msg, ctx, arrays = _message(cfg, data_dir, 1)
        reply = train(msg, ctx)
        assert not reply.has_error(), reply.error
        shapes = {k: v.shape for k, v in arrays.items()}
        deltas.append(decode_delta(reply.content.array_records["arrays"], shapes))
    assert any(not np.array_equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    store = Store(data_dir / "store.db", load_key(data_dir / "store.key"))
    try:
        assert store.meta_int("releases") == 2
        # Both releases charged: eligible twice, counted twice, one drift release.
        assert store.spend() == [(2, 2 + cfg.drift.query_weight, n)]
    finally:
        store.close()
