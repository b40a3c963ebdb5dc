"""Client-level DP at the server (DP-FedAvg): clipping, equal weights over the hosts
asked, Gaussian noise of the stated size, and its accounting."""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from common.adapter import encode_delta, layout_id
from common.config import RunConfig
from common.errors import ConfigError, PrivacyError
from server.checks import update_norm
from server.client_dp import ClientDP, client_dp_for
from server.policies import make_policy
from server.strategy import AdapterFedAvg
from tests.conftest import aggregate_named

SHAPES = OrderedDict([("a.lora_B.weight", (200, 30)), ("b.lora_B.weight", (40, 100))])
SIZE = 200 * 30 + 40 * 100

pytestmark = pytest.mark.usefixtures("task_identity")


def _global():
    return OrderedDict((k, np.zeros(s, dtype=np.float32)) for k, s in SHAPES.items())


def _direction(seed: int) -> OrderedDict[str, np.ndarray]:
    """A random unit-norm delta."""
    rng = np.random.default_rng(seed)
    d = OrderedDict(
        (k, rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()
    )
    norm = update_norm(d)
    return OrderedDict((k, (v / norm).astype(np.float32)) for k, v in d.items())


def _reply(node, host, delta, n=64, drift=0.0):
    g = _global()
    incoming = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "arrays": encode_delta({k: g[k] + delta[k] for k in g}, g, "float32"),
            "metrics": MetricRecord(
                {"num-examples": n, "train-loss": 1.0, "drift-score": drift}
            ),
            "info": ConfigRecord({"host": host, "layout": layout_id(SHAPES)}),
        }
    )
    return Message(content=content, reply_to=incoming)


def _strategy(clip, z, rng=None, policy="fedavg"):
    cfg = RunConfig.build({"aggregation": {"policy": policy}})
    return AdapterFedAvg(
        global_arrays=_global(),
        base_config={},
        policy=make_policy(cfg.aggregation),
        client_dp=ClientDP(clip_norm=clip, noise_multiplier=z, delta=1e-3),
        noise_rng=rng,
    )


def test_updates_are_clipped_and_weighed_equally_over_the_hosts_asked():
    """Norms 0.5, 10 and 3 with C = 1; a fourth host sends NaN and is rejected but
    still counts in n: the mean is (d1 + d2/10 + d3/3) / 4, whatever the example
    counts and drift scores say (the drift policy would weigh them otherwise)."""
    dirs = [_direction(s) for s in range(3)]
    norms = [0.5, 10.0, 3.0]
    deltas = [
        OrderedDict((k, n * v) for k, v in d.items())
        for d, n in zip(dirs, norms, strict=True)
    ]
    bad = OrderedDict((k, np.full(s, np.nan, np.float32)) for k, s in SHAPES.items())
    replies = [
        _reply(1, "h1", deltas[0], n=10, drift=1.0),
        _reply(2, "h2", deltas[1], n=500),
        _reply(3, "h3", deltas[2], n=90),
        _reply(4, "h4", bad),
    ]
    strat = _strategy(clip=1.0, z=1e-9, policy="drift")
    arrays, _ = aggregate_named(strat, 1, replies)
    assert arrays is not None
    assert strat.outcome.hosts == ["h1", "h2", "h3"]
    assert "NaN" in strat.outcome.rejected["h4"]
    assert strat.outcome.weights == {"h1": 0.25, "h2": 0.25, "h3": 0.25}
    assert strat.outcome.step == 1.0
    assert strat.outcome.clipped == pytest.approx({"h2": 10.0, "h3": 3.0}, rel=1e-5)
    for k in SHAPES:
        expected = (0.5 * dirs[0][k] + dirs[1][k] + dirs[2][k]) / 4
        np.testing.assert_allclose(arrays[k].numpy(), expected, rtol=0, atol=1e-6)


def test_noise_on_the_mean_has_std_z_c_over_n():
    """Four hosts send zero updates; the aggregate is pure noise with standard
    deviation z x C / 4 in every coordinate (10,000 coordinates: the estimate's own
    spread is 0.7%)."""
    zero = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    strat = _strategy(clip=0.5, z=2.0, rng=np.random.default_rng(7))
    arrays, _ = aggregate_named(strat, 1, [_reply(i, f"h{i}", zero) for i in range(4)])
    assert arrays is not None
    values = np.concatenate([arrays[k].numpy().ravel() for k in SHAPES])
    assert values.size == SIZE
    assert abs(values.mean()) < 0.01
    assert values.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.03)


def test_noise_is_not_reproducible_from_anything_the_hosts_know():
    """Without an injected generator the noise comes from the OS's CSPRNG: two
    servers with the same config and the same replies publish different adapters."""
    zero = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    outs = []
    for _ in range(2):
        strat = _strategy(clip=1.0, z=1.0)
        arrays, _ = aggregate_named(strat, 1, [_reply(1, "h1", zero)])
        assert arrays is not None
        outs.append(arrays["a.lora_B.weight"].numpy())
    assert not np.allclose(outs[0], outs[1])
    assert outs[0].std() > 0.5  # z x C / 1


def test_client_epsilon_matches_opacus_rdp_and_target_round_trips():
    mech = ClientDP(clip_norm=1.0, noise_multiplier=1.3, delta=1e-3)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for rounds in (1, 5, 20):
        rdp = compute_rdp(q=1.0, noise_multiplier=1.3, steps=rounds, orders=orders)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-3)
        assert mech.epsilon(rounds) == pytest.approx(eps, rel=1e-6)
    assert mech.epsilon(0) == 0.0
    assert mech.epsilon(5) < mech.epsilon(20)

    cfg = RunConfig.build(
        {
            "federation": {"rounds": 10},
            "client_dp": {"enabled": True, "clip_norm": 0.1, "target_epsilon": 4.0},
        }
    )
    derived = client_dp_for(cfg)
    assert derived is not None and derived.clip_norm == 0.1
    assert derived.epsilon(10) <= 4.0
    assert derived.epsilon(10) == pytest.approx(4.0, rel=0.01)
    smaller = ClientDP(
        clip_norm=0.1, noise_multiplier=derived.noise_multiplier * 0.99, delta=1e-3
    )
    assert smaller.epsilon(10) > 4.0  # the smallest z that reaches the target
    assert client_dp_for(RunConfig.build({})) is None


def test_client_dp_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"client_dp\.clip_norm"):
        RunConfig.build({"client_dp": {"enabled": True, "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match=r"client_dp\.target_epsilon"):
        RunConfig.build({"client_dp": {"enabled": True, "clip_norm": 1.0}})
    with pytest.raises(ConfigError, match="clip_norm"):
        RunConfig.build({"client_dp": {"clip_norm": -1.0}})
    cfg = RunConfig.build(
        {
            "federation": {"rounds": 10},
            "client_dp": {"enabled": True, "clip_norm": 1.0, "target_epsilon": 1e-6},
        }
    )
    with pytest.raises(PrivacyError, match=r"client_dp\.target_epsilon"):
        client_dp_for(cfg)
