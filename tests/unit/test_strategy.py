"""Server aggregation of adapter deltas: weighting, rejection of bad replies."""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.adapter import encode_delta, layout_id, to_record, unpack_global
from server.strategy import AdapterFedAvg
from tests.conftest import aggregate_named


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need a task identity, as run_simulation sets for the ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


SHAPES = OrderedDict([("a.lora_B.weight", (4, 2)), ("b.lora_B.weight", (3, 2))])


def _global():
    rng = np.random.default_rng(0)
    return OrderedDict(
        (k, rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()
    )


def _reply(node, host, arrays, n=64, layout=None, error=None, extra=None):
    incoming = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    if error:
        return Message(Error(code=2, reason=error), reply_to=incoming)
    info = ConfigRecord({"host": host, "layout": layout or layout_id(SHAPES)})
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord(
                {"num-examples": n, "train-loss": 1.0, **(extra or {})}
            ),
            "info": info,
        }
    )
    return Message(content=content, reply_to=incoming)


def _delta(g, value, dtype="float32"):
    return encode_delta({k: v + value for k, v in g.items()}, g, dtype)


def test_weighted_mean_of_deltas_is_added_to_the_global_adapter():
    g = _global()
    strat = AdapterFedAvg(global_arrays=g, base_config={})
    replies = [
        _reply(1, "h1", _delta(g, 1.0), n=64),
        _reply(2, "h2", _delta(g, 4.0), n=192),
    ]
    record, metrics = strat.aggregate_train(1, replies)
    arrays = unpack_global(record, SHAPES)  # the next round's message: one array
    assert len(record) == 1
    expected = 1.0 * 0.25 + 4.0 * 0.75
    for k in g:
        np.testing.assert_allclose(arrays[k], g[k] + expected, rtol=1e-6)
    assert metrics["hosts"] == 2
    assert strat.outcome.hosts == ["h1", "h2"]
    assert strat.outcome.bytes["h1"] > 14 * 4


def test_bad_replies_are_rejected_with_reasons_and_the_round_goes_on():
    g = _global()
    strat = AdapterFedAvg(global_arrays=g, base_config={})
    nan = {k: v.copy() for k, v in g.items()}
    nan["a.lora_B.weight"][0, 0] = np.nan
    flat = _delta(g, 1.0)["delta"].numpy()
    replies = [
        _reply(1, "good", _delta(g, 2.0)),
        _reply(2, "nan", encode_delta(nan, g, "float32")),
        _reply(3, "layout", _delta(g, 1.0), layout="0" * 16),
        _reply(4, "short", to_record({"delta": flat[:-2]})),
        _reply(5, "zero-weight", _delta(g, 1.0), n=0),
        _reply(6, "crashed", None, error="TrainingError: loss exploded"),
    ]
    arrays, _ = aggregate_named(strat, 3, replies)
    for k in g:
        np.testing.assert_allclose(arrays[k].numpy(), g[k] + 2.0, rtol=1e-6)
    out = strat.outcome
    assert out.hosts == ["good"]
    assert "NaN" in out.rejected["nan"]
    assert "layout" in out.rejected["layout"]
    assert "expected" in out.rejected["short"]
    assert "num-examples" in out.rejected["zero-weight"]
    assert out.failed == {"node-6": "TrainingError: loss exploded"}


def test_no_usable_update_keeps_the_global_adapter():
    g = _global()
    strat = AdapterFedAvg(global_arrays=g, base_config={})
    arrays, metrics = aggregate_named(strat, 1, [_reply(1, "x", None, error="boom")])
    assert arrays is None and metrics is None
    assert all(np.array_equal(strat.global_arrays[k], g[k]) for k in g)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fp16_and_fp32_updates_are_both_accepted(dtype):
    g = _global()
    strat = AdapterFedAvg(global_arrays=g, base_config={})
    arrays, _ = aggregate_named(strat, 1, [_reply(1, "h", _delta(g, 0.5, dtype))])
    for k in g:
        np.testing.assert_allclose(arrays[k].numpy(), g[k] + 0.5, atol=1e-3)


# -- weighting policies -----------------------------------------------------------
def _updates(scores, n=(64, 128, 96, 32), seed=0, scale=None):
    from server.policies import HostUpdate

    rng = np.random.default_rng(seed)
    common = rng.normal(size=40)
    out = []
    for i, (s, k) in enumerate(zip(scores, n, strict=True)):
        flat = common + 0.5 * rng.normal(size=40)
        if scale and i in scale:
            flat = flat * scale[i]
        delta = OrderedDict([("a", flat[:24].reshape(4, 6)), ("b", flat[24:])])
        out.append(HostUpdate(f"h{i}", delta, float(k), drift_score=s))
    return out


@pytest.mark.parametrize("score", [0.0, 0.4, 0.7, 1.0])
def test_drift_policy_with_equal_scores_and_no_outliers_is_exactly_fedavg(score):
    from common.config import AggregationConfig
    from server.policies import DriftPolicy, FedAvgPolicy

    updates = _updates([score] * 4)
    drift = DriftPolicy(AggregationConfig(policy="drift")).weigh(updates)
    fedavg = FedAvgPolicy(AggregationConfig()).weigh(updates)
    assert drift.weights == fedavg.weights
    assert drift.damped == {} and drift.scale == {}
    # Hosts drifting together move the server step (Flash-style); no drift: 1.
    assert drift.step == pytest.approx(1.0 + 2.0 * score if score >= 0.5 else 1.0)
    assert fedavg.step == 1.0


def test_drift_policy_without_drift_gives_fedavg_global_bit_for_bit():
    from common.config import AggregationConfig
    from server.policies import DriftPolicy, FedAvgPolicy

    g = _global()
    out = {}
    for name, policy in (
        ("fedavg", FedAvgPolicy(AggregationConfig())),
        ("drift", DriftPolicy(AggregationConfig(policy="drift"))),
    ):
        strat = AdapterFedAvg(global_arrays=g, base_config={}, policy=policy)
        replies = [
            _reply(i, f"h{i}", _delta(g, 0.01 * i), n=32 * i) for i in range(1, 5)
        ]
        arrays, _ = aggregate_named(strat, 1, replies)
        out[name] = {k: arrays[k].numpy() for k in g}
        assert strat.outcome.step == 1.0
    assert all(np.array_equal(out["fedavg"][k], out["drift"][k]) for k in g)


def test_drift_policy_server_step_scales_the_mean_update():
    from common.config import AggregationConfig
    from server.policies import DriftPolicy

    g = _global()
    cfg = AggregationConfig(policy="drift", drift_boost=0.0, server_boost=2.0)
    strat = AdapterFedAvg(global_arrays=g, base_config={}, policy=DriftPolicy(cfg))
    replies = [
        _reply(1, "h1", _delta(g, 0.01), extra={"drift-score": 0.5}),
        _reply(2, "h2", _delta(g, 0.03), extra={"drift-score": 0.4}),
    ]
    arrays, _ = aggregate_named(strat, 1, replies)
    # Equal weights (no boost); h2's 0.4 is below 0.5 and does not count: mean
    # score 0.25, step 1.5 on the mean delta 0.02.
    assert strat.outcome.step == pytest.approx(1.5)
    for k in g:
        np.testing.assert_allclose(arrays[k].numpy() - g[k], 0.03, atol=1e-5)
    capped = DriftPolicy(
        AggregationConfig(policy="drift", server_boost=10.0, max_server_step=2.5)
    ).weigh(_updates([1.0] * 4))
    assert capped.step == 2.5


def test_drift_policy_boosts_drifting_hosts_and_damps_a_huge_update():
    from common.config import AggregationConfig
    from server.policies import DriftPolicy

    cfg = AggregationConfig(policy="drift", drift_boost=2.0)
    w = DriftPolicy(cfg).weigh(_updates([1.0, 0.0, 0.0, 0.0], n=(64, 64, 64, 64)))
    assert w.weights["h0"] == pytest.approx(3 * w.weights["h1"])
    huge = DriftPolicy(cfg).weigh(_updates([0.0] * 4, scale={2: 1000.0}))
    assert "h2" in huge.damped and "norm" in huge.damped["h2"]
    assert huge.scale["h2"] < 0.01
    flipped = DriftPolicy(cfg).weigh(_updates([0.0] * 4, scale={3: -1.0}))
    assert flipped.weights["h3"] == 0.0 and "cosine" in flipped.damped["h3"]


def test_strategy_under_drift_policy_rejects_nan_damps_huge_and_goes_on():
    from common.config import AggregationConfig
    from server.policies import DriftPolicy

    g = _global()
    strat = AdapterFedAvg(
        global_arrays=g,
        base_config={},
        policy=DriftPolicy(AggregationConfig(policy="drift")),
    )
    nan = {k: v.copy() for k, v in g.items()}
    nan["b.lora_B.weight"][1, 1] = np.inf
    replies = [
        _reply(1, "h1", _delta(g, 0.01)),
        _reply(2, "h2", _delta(g, 0.012)),
        _reply(3, "h3", _delta(g, 0.011)),
        _reply(4, "huge", _delta(g, 50.0)),
        _reply(5, "nan", encode_delta(nan, g, "float32")),
    ]
    arrays, _ = aggregate_named(strat, 1, replies)
    assert "NaN/Inf" in strat.outcome.rejected["nan"]
    assert "norm" in strat.outcome.damped["huge"]
    assert set(strat.outcome.weights) == {"h1", "h2", "h3", "huge"}
    moved = max(float(np.abs(arrays[k].numpy() - g[k]).max()) for k in g)
    assert moved < 0.05  # the huge update was scaled down to 3x the median norm


def test_unknown_policy_is_a_config_error_naming_the_field():
    from common.config import AggregationConfig
    from common.errors import ConfigError
    from server.policies import make_policy

    with pytest.raises(ConfigError, match=r"aggregation\.policy.*drift, fedavg"):
        make_policy(AggregationConfig(policy="fedmagic"))


# -- norm bound (server.checks) -----------------------------------------------------
def test_update_above_the_norm_bound_is_rejected_and_the_round_goes_on():
    from server.checks import update_norm

    g = _global()
    size = sum(v.size for v in g.values())
    strat = AdapterFedAvg(global_arrays=g, base_config={}, max_update_norm=1.0)
    replies = [
        _reply(1, "h1", _delta(g, 0.1), n=64),
        _reply(2, "h2", _delta(g, 0.2), n=64),
        _reply(3, "huge", _delta(g, 50.0), n=64),
    ]
    arrays, metrics = aggregate_named(strat, 1, replies)
    out = strat.outcome
    assert out.hosts == ["h1", "h2"]
    assert set(out.rejected) == {"huge"}
    assert "norm" in out.rejected["huge"] and "max_update_norm" in out.rejected["huge"]
    norm = update_norm({"x": np.full(size, 50.0, np.float32)})
    assert f"{norm:.4g}" in out.rejected["huge"]
    assert metrics["hosts"] == 2
    for k in g:  # the mean of the two accepted deltas only
        np.testing.assert_allclose(arrays[k].numpy(), g[k] + 0.15, rtol=1e-5)


def test_derived_bound_holds_for_real_dp_adam_updates_and_is_not_loose_by_orders():
    """The derived bound is above what DP-Adam training really moves, and within
    a small factor of it (so a far larger update is rejected)."""
    from client.trainer import train_local
    from common.adapter import trainable_state
    from common.config import RunConfig
    from common.corpus import host_records
    from common.lm import encode
    from common.models import build_adapter_model, load_base_model
    from server.checks import update_norm, update_norm_bound

    for mu in (0.0, 1.0):
        cfg = RunConfig.build(
            {
                "model": {"name": "tiny-llama", "max_length": 48},
                "training": {"local_steps": 4, "sample_rate": 0.25},
                "aggregation": {"proximal_mu": mu},
                "privacy": {"noise_multiplier": 1.0},
            }
        )
        base = load_base_model(cfg.model)
        model = build_adapter_model(base, cfg.lora, seed=0)
        data = encode(host_records(0, 64, seed=0), base.tokenizer, 48)
        start = trainable_state(model)
        res = train_local(
            model,
            data,
            training=cfg.training,
            privacy=cfg.privacy,
            noise_multiplier=1.0,
            seed=3,
            proximal_mu=mu,
        )
        norm = update_norm({k: res.arrays[k] - start[k] for k in start})
        bound = update_norm_bound(cfg, sum(v.size for v in start.values()))
        assert bound is not None
        assert norm < bound < 30 * norm, (norm, bound)


def test_norm_bound_config():
    from common.config import RunConfig
    from server.checks import update_norm_bound

    sgd = RunConfig.build({"training": {"optimizer": "sgd"}})
    assert update_norm_bound(sgd, 100) is None
    fixed = RunConfig.build({"aggregation": {"max_update_norm": 2.5}})
    assert update_norm_bound(fixed, 100) == 2.5
    off = RunConfig.build({"aggregation": {"max_update_norm": 0}})
    assert update_norm_bound(off, 100) is None


def test_each_node_the_superlink_gave_up_on_is_reported_failed():
    """The SuperLink answers for unavailable nodes in its own name (node 1): the
    failures are keyed by the node each message went to, not overwritten."""
    g = _global()
    strat = AdapterFedAvg(global_arrays=g, base_config={})
    sent = [
        Message(content=RecordDict(), dst_node_id=n, message_type="train")
        for n in (11, 12, 13)
    ]
    for i, m in enumerate(sent):  # what the grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"id-{i}"
    strat._sent = sent
    replies = [_reply(11, "h1", _delta(g, 1.0))]
    for m in sent[1:]:
        err = Message(Error(code=3, reason="Node Unavailable"), reply_to=m)
        err.metadata.__dict__["_src_node_id"] = 1
        replies.append(err)
    strat.aggregate_train(1, replies)
    assert strat.outcome.failed == {
        "node-12": "Node Unavailable",
        "node-13": "Node Unavailable",
    }
