"""The ClientApp train handler, called with real Flower messages on a tiny model."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.host
from client.app import coarse_count, train
from client.host import adapter_model
from common.adapter import decode_delta, layout_id, to_record, trainable_state
from common.config import RunConfig
from common.corpus import host_records
from common.privacy import Ledger


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


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
    records = tmp_path / "host-a" / "records"
    records.mkdir(parents=True)
    (records / "s.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in host_records(0, 40, seed=0))
    )
    return cfg, tmp_path / "host-a"


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


def test_round_reply_and_ledger(setup):
    cfg, data_dir = setup
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
    assert metrics["num-examples"] == coarse_count(40) == 32
    ledger = Ledger.load(data_dir / "ledger.json", accountant="rdp", delta=1e-5)
    assert len(ledger.events) == 1
    assert (
        metrics["epsilon"] == pytest.approx(ledger.epsilon()) and ledger.epsilon() > 0
    )


def test_host_over_budget_refuses_and_says_so_even_after_restart(setup):
    cfg, data_dir = setup
    for rnd in (1, 2):  # the planned rounds spend the budget exactly
        msg, ctx, _ = _message(cfg, data_dir, rnd)
        assert not train(msg, ctx).has_error()
    spent = Ledger.load(data_dir / "ledger.json", accountant="rdp", delta=1e-5)
    assert spent.epsilon() == pytest.approx(3.0, abs=0.01) and spent.epsilon() <= 3.0
    client.host._MODELS.clear()  # a restarted host process
    client.host._DATA.clear()
    msg, ctx, _ = _message(cfg, data_dir, 3)
    reply = train(msg, ctx)
    assert reply.has_error()
    assert "privacy budget spent" in reply.error.reason
    after = Ledger.load(data_dir / "ledger.json", accountant="rdp", delta=1e-5)
    assert len(after.events) == 2  # the refused round spent nothing


def test_missing_data_comes_back_as_an_error_reply(tmp_path, setup):
    cfg, _ = setup
    msg, ctx, _ = _message(cfg, tmp_path / "nowhere", 1)
    reply = train(msg, ctx)
    assert reply.has_error() and "does not exist" in reply.error.reason


def test_noise_and_sampling_come_from_the_host_secret_not_the_config(tmp_path, setup):
    """The server knows the whole run config (seed included); it must not be able to
    regenerate a host's noise. Same config + same records + other secret = other
    update; same secret = same update (a re-run round repeats its noise)."""
    import shutil
    import stat

    cfg, data_dir = setup
    twin = tmp_path / "host-b"
    shutil.copytree(data_dir / "records", twin / "records")
    deltas = []
    _, _, start = _message(cfg, data_dir, 1)  # one global adapter for all three
    for d in (data_dir, twin, data_dir):
        if d == data_dir and (d / "ledger.json").exists():
            (d / "ledger.json").unlink()  # same starting budget for the repeat
        msg, ctx, _ = _message(cfg, d, 1, arrays=start)
        reply = train(msg, ctx)
        assert not reply.has_error(), reply.error
        deltas.append(reply.content.array_records["arrays"]["delta"].numpy())
    assert not np.array_equal(deltas[0], deltas[1])
    assert np.array_equal(deltas[0], deltas[2])
    for d in (data_dir, twin):
        assert stat.S_IMODE((d / "host.secret").stat().st_mode) == 0o600
        assert len((d / "host.secret").read_bytes()) == 32
    assert (data_dir / "host.secret").read_bytes() != (
        twin / "host.secret"
    ).read_bytes()
