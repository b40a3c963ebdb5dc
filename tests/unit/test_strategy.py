"""Server aggregation of adapter deltas: weighting, rejection of bad replies."""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.adapter import encode_delta, layout_id, to_record
from server.strategy import AdapterFedAvg


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


def _reply(node, host, arrays, n=64, layout=None, error=None):
    incoming = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    if error:
        return Message(Error(code=2, reason=error), reply_to=incoming)
    info = ConfigRecord({"host": host, "layout": layout or layout_id(SHAPES)})
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0}),
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
    arrays, metrics = strat.aggregate_train(1, replies)
    expected = 1.0 * 0.25 + 4.0 * 0.75
    for k in g:
        np.testing.assert_allclose(arrays[k].numpy(), g[k] + expected, rtol=1e-6)
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
    arrays, _ = strat.aggregate_train(3, replies)
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
    arrays, metrics = strat.aggregate_train(1, [_reply(1, "x", None, error="boom")])
    assert arrays is None and metrics is None
    assert all(np.array_equal(strat.global_arrays[k], g[k]) for k in g)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fp16_and_fp32_updates_are_both_accepted(dtype):
    g = _global()
    strat = AdapterFedAvg(global_arrays=g, base_config={})
    arrays, _ = strat.aggregate_train(1, [_reply(1, "h", _delta(g, 0.5, dtype))])
    for k in g:
        np.testing.assert_allclose(arrays[k].numpy(), g[k] + 0.5, atol=1e-3)
